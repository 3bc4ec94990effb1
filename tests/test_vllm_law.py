"""Through vLLM itself, with the plugin: the joint law of the first two emitted tokens.

A tiny random pair (11 tokens, `build_tiny_vllm_pair`) runs in vLLM with a draft model,
2 speculative tokens and probabilistic draft sampling. Thousands of requests from one prompt,
`exact`, `static:0.5` and a guarded `static:0.5` interleaved in the same batches, emit two
tokens each: the first comes from vLLM's prefill sampler (p), the second from the first
verification, whose law is the method's verification target v(p, q). Theory is enumerated from
the same models with transformers; a chi-square test must accept each method's own law and
reject the others'. The guard watches the stop tokens the worker reads from vLLM (EOS, which
vLLM keeps in `all_stop_token_ids` under `ignore_eos` too); its threshold guards the second
position after some first tokens and not after others.

Needs vLLM (the environment scripts/setup_vllm.sh builds); skipped where it is not importable.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup_vllm.sh builds its environment)")

from diversed.guard import Guarded, vocabulary_of  # noqa: E402
from diversed.methods import make_verifier  # noqa: E402
from diversed.testing import build_tiny_vllm_pair  # noqa: E402
from diversed.verifiers import EMPTY_CONTEXT, Exact, StaticEnsemble  # noqa: E402

from .test_engine_statistics import chi_square_pvalue  # noqa: E402

PROMPT = [5, 6, 7]
REQUESTS = 3000  # per method
# Between the pair's EOS masses max(p(EOS), q(EOS)) after the 11 first tokens: guards about half of them.
GUARD_TAU = 0.083
METHODS = {"exact": {"method": "exact"}, "static:0.5": {"method": "static", "weight": 0.5},
           "static:0.5 guarded": {"method": "static", "weight": 0.5, "guard": GUARD_TAU}}
REAL_PAIR_METHODS = {"exact": ({"method": "exact"}, Exact()), "static:0.5": ({"method": "static", "weight": 0.5}, StaticEnsemble(0.5))}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_tiny_vllm_pair(tmp_path_factory.mktemp("vllm-pair"))


@pytest.fixture(scope="module")
def llm(pair):
    # In-process engine: one process, and the plugin's clock readable here.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    target, draft = pair
    return LLM(
        model=str(target), dtype="float32", max_model_len=64, seed=0, enforce_eager=True, max_num_seqs=256,
        kv_cache_memory_bytes=256 << 20, generation_config="vllm", distributed_executor_backend="uni",
        speculative_config={"method": "draft_model", "model": str(draft), "num_speculative_tokens": 2, "draft_sample_method": "probabilistic"},
    )


@pytest.fixture(scope="module")
def verifiers(pair):
    """Each method's verifier; the guarded one with the vocabulary vLLM's worker builds: the served
    model's tokenizer, and the request's `all_stop_token_ids` (here EOS) with the tokenizer's EOS id."""
    from transformers import AutoTokenizer

    from diversed.integrations.vllm.requests import guard_vocabulary

    tokenizer = AutoTokenizer.from_pretrained(str(pair[0]))
    guarded = make_verifier("static", weight=0.5, guard=GUARD_TAU, vocabulary=guard_vocabulary(tokenizer, {tokenizer.eos_token_id}))
    return {"exact": Exact(), "static:0.5": StaticEnsemble(0.5), "static:0.5 guarded": guarded}


@pytest.fixture(scope="module")
def distributions(pair):
    """p at the prompt [V]; p and q after the prompt and each first token x ([V, V], row x)."""
    from transformers import AutoModelForCausalLM

    target, draft = (AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32) for path in pair)
    with torch.no_grad():
        p1 = target(torch.tensor([PROMPT])).logits[0, -1].softmax(-1)
        contexts = torch.tensor([PROMPT + [x] for x in range(p1.shape[0])])
        p2 = target(contexts).logits[:, -1].softmax(-1).double()  # [V, V]: row x is p after PROMPT + [x]
        q2 = draft(contexts).logits[:, -1].softmax(-1).double()
    return p1, p2, q2


def theory(distributions, verifier) -> dict[tuple[int, int], float]:
    """P(first token, second token): p at the prompt, then the verifier's emitted law after it."""
    p1, p2, q2 = distributions
    emitted = verifier.tables(p2, q2, EMPTY_CONTEXT).emitted  # [V, V]
    return {(x, y): float(p1[x] * emitted[x, y]) for x in range(p1.shape[0]) for y in range(p1.shape[0])}


@pytest.fixture(scope="module")
def samples(llm):
    from vllm import SamplingParams

    names = list(METHODS)
    requests = [names[i % len(names)] for i in range(REQUESTS * len(names))]  # interleaved: methods share batches
    params = [SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True, extra_args={"speculative": METHODS[name]}) for name in requests]
    outputs = llm.generate([{"prompt_token_ids": PROMPT}] * len(requests), params, use_tqdm=False)
    counts: dict[str, dict] = {name: {} for name in names}
    for name, output in zip(requests, outputs):
        key = tuple(output.outputs[0].token_ids[:2])
        counts[name][key] = counts[name].get(key, 0) + 1
    return counts


@pytest.mark.parametrize("name", list(METHODS))
def test_vllm_emits_the_methods_law(distributions, verifiers, samples, name):
    assert chi_square_pvalue(samples[name], theory(distributions, verifiers[name]), REQUESTS) > 1e-4


def test_the_law_test_rejects_a_wrong_law(distributions, verifiers, samples):
    laws = {name: theory(distributions, verifier) for name, verifier in verifiers.items()}
    for name in METHODS:
        for other in METHODS:
            if other != name:
                assert chi_square_pvalue(samples[name], laws[other], REQUESTS) < 1e-6, (name, other)


def test_the_guard_is_the_workers_and_changes_the_law(distributions, verifiers, samples):
    """The worker built the guard the theory uses (same tokenizer, same stop ids), and it matters here."""
    from diversed.integrations.vllm.plugin import built_verifiers

    guarded = verifiers["static:0.5 guarded"]
    assert isinstance(guarded, Guarded) and guarded in built_verifiers()
    _, p2, q2 = distributions
    assert 0 < int(guarded.guarded(p2, q2).sum()) < p2.shape[0]  # some first tokens are followed by a guarded position, not all
    laws = {name: theory(distributions, verifier) for name, verifier in verifiers.items()}
    for other in ("static:0.5", "exact"):
        distance = 0.5 * sum(abs(laws["static:0.5 guarded"][key] - laws[other][key]) for key in laws[other])
        assert distance > 0.1, (other, distance)


def test_bad_requests_get_one_clear_error(llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError  # the server answers it with a 400 naming `parameter`

    cases = {
        "speculative.method": {"method": "statc"},
        "speculative.weight": {"method": "static", "weight": 1.5},
        "speculative.wieght": {"method": "static", "wieght": 0.5},
        "speculative.guard": {"method": "static", "weight": 0.5, "guard": 1.5},
    }
    for field, options in cases.items():
        with pytest.raises(VLLMValidationError, match=field.replace(".", r"\.")):
            llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=1, extra_args={"speculative": options}), use_tqdm=False)
    for method in ("diversed", "judge"):
        with pytest.raises(VLLMValidationError, match="vLLM cannot verify against"):
            llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=1, extra_args={"speculative": {"method": method}}), use_tqdm=False)
    with pytest.raises(VLLMValidationError, match="temperature > 0"):
        llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(temperature=0, max_tokens=1, extra_args={"speculative": {"weight": 0.5}}),
                     use_tqdm=False)


# --------------------------------------------------------------------------- the real pair


def trials(prompt_ids: list[int], output_ids: list[int], accepted_per_step: list[int], drafted_per_step: list[int]) -> list[tuple[int, bool]]:
    """(position in the output, accepted?) of every verified drafted token, from vLLM's per-step counts.

    The first output token comes from prefill; each step then verifies drafts from the cursor
    on: `a` accepted ones, one rejected one if a < drafted, and moves the cursor by a + 1 (the
    accepted tokens and the recovered or bonus token). Trials past the output's end (cut by
    max_tokens) are dropped: whether a position exists depends on its index alone.
    """
    found, cursor = [], 1
    for accepted, drafted in zip(accepted_per_step, drafted_per_step):
        outcomes = [True] * accepted + ([False] if accepted < drafted else [])
        found += [(cursor + j, ok) for j, ok in enumerate(outcomes) if cursor + j < len(output_ids)]
        cursor += accepted + 1
    return found


@pytest.mark.slow
def test_vllm_acceptance_on_the_real_pair_is_the_engines():
    """Accepted counts through vLLM against the acceptance law our engine uses, position by position.

    At a verified position j, P(accept | history) = sum_x q_j(x) min(1, v_j(x)/q_j(x)), computed
    from the output prefix with the verifier's own tables (what `engine.verify_block` uses). The
    sum over positions of (accepted - that probability) is a martingale: its z-score must be
    small for exact and static:0.5; and static:0.5 must accept more than exact.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from diversed.embedded import DEFAULT_DRAFT, DEFAULT_TARGET, convert_embedded

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    target_dir, draft_dir = convert_embedded(DEFAULT_TARGET), convert_embedded(DEFAULT_DRAFT)
    tokenizer = AutoTokenizer.from_pretrained(str(target_dir))
    questions = ["Write a Python function that reverses a string.", "What is 17 times 23? Explain briefly.",
                 "List three prime numbers and say why they are prime.", "Write a haiku about the sea."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True) for q in questions]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]
    # max_num_batched_tokens bounds vLLM's warm-up batch (logits over the whole vocabulary);
    # the engine goes before the two transformers models load, so the test fits a 24 GiB machine.
    llm = LLM(model=str(target_dir), dtype="float32", max_model_len=512, max_num_batched_tokens=512, seed=0, enforce_eager=True,
              max_num_seqs=8, kv_cache_memory_bytes=1 << 30, generation_config="vllm", distributed_executor_backend="uni",
              per_request_spec_decode_metrics="detailed",
              speculative_config={"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": 3, "draft_sample_method": "probabilistic"})
    completions = {}
    for name, (options, _) in REAL_PAIR_METHODS.items():
        params = SamplingParams(temperature=1.0, max_tokens=48, ignore_eos=True, extra_args={"speculative": options})
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts * 2], params, use_tqdm=False)
        completions[name] = [output.outputs[0] for output in outputs]
    del llm, outputs
    gc.collect()
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32)
    draft = AutoModelForCausalLM.from_pretrained(str(draft_dir), dtype=torch.float32)
    rates = {}
    for name, (_, verifier) in REAL_PAIR_METHODS.items():
        accepted = expected = variance = 0.0
        count = 0
        for prompt_ids, completion in zip(prompts * 2, completions[name]):
            metrics = completion.spec_decode_metrics
            found = trials(prompt_ids, list(completion.token_ids), metrics.per_step_accepted, metrics.per_step_drafted)
            ids = torch.tensor([prompt_ids + list(completion.token_ids)])
            with torch.no_grad():
                p = target(ids).logits[0].softmax(-1).double()
                q = draft(ids).logits[0].softmax(-1).double()
            rows = torch.tensor([len(prompt_ids) + j - 1 for j, _ in found])  # logits at i predict token i + 1
            tables = verifier.tables(p[rows], q[rows], EMPTY_CONTEXT)
            alpha = (q[rows] * tables.acceptance).sum(-1)
            accepted += sum(ok for _, ok in found)
            expected += float(alpha.sum())
            variance += float((alpha * (1 - alpha)).sum())
            count += len(found)
        z = (accepted - expected) / variance ** 0.5
        rates[name] = accepted / count
        print(f"{name}: {accepted:.0f} of {count} accepted, expected {expected:.1f}, z = {z:.2f}")
        assert abs(z) < 4, f"{name}: vLLM accepted {accepted:.0f}, the engine's law expects {expected:.1f} (z = {z:.2f})"
    assert rates["static:0.5"] > rates["exact"]
