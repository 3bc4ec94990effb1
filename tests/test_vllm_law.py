"""Through vLLM itself, with the plugin: the joint law of the first two emitted tokens.

A tiny random pair (11 tokens, `build_tiny_vllm_pair`) runs in vLLM with a draft model,
2 speculative tokens and probabilistic draft sampling. Thousands of requests from one prompt,
`exact` and `static:0.5` interleaved in the same batches, emit two tokens each: the first comes
from vLLM's prefill sampler (p), the second from the first verification, whose law is the
method's verification target v(p, q). Theory is enumerated from the same models with
transformers; a chi-square test must accept each method's own law and reject the other's.

Needs vLLM (the environment scripts/setup_vllm.sh builds); skipped where it is not importable.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/setup_vllm.sh builds its environment)")

from diversed.testing import build_tiny_vllm_pair  # noqa: E402
from diversed.verifiers import EMPTY_CONTEXT, Exact, StaticEnsemble  # noqa: E402

from .test_engine_statistics import chi_square_pvalue  # noqa: E402

PROMPT = [5, 6, 7]
REQUESTS = 3000  # per method
METHODS = {"exact": ({"method": "exact"}, Exact()), "static:0.5": ({"method": "static", "weight": 0.5}, StaticEnsemble(0.5))}


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


def theory(pair, verifier) -> dict[tuple[int, int], float]:
    """P(first token, second token): p at the prompt, then the verifier's emitted law after it."""
    from transformers import AutoModelForCausalLM

    target, draft = (AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32) for path in pair)
    with torch.no_grad():
        p1 = target(torch.tensor([PROMPT])).logits[0, -1].softmax(-1)
        contexts = torch.tensor([PROMPT + [x] for x in range(p1.shape[0])])
        p2 = target(contexts).logits[:, -1].softmax(-1).double()  # [V, V]: row x is p after PROMPT + [x]
        q2 = draft(contexts).logits[:, -1].softmax(-1).double()
    emitted = verifier.tables(p2, q2, EMPTY_CONTEXT).emitted  # [V, V]
    return {(x, y): float(p1[x] * emitted[x, y]) for x in range(p1.shape[0]) for y in range(p1.shape[0])}


@pytest.fixture(scope="module")
def samples(llm):
    from vllm import SamplingParams

    names = list(METHODS)
    requests = [names[i % len(names)] for i in range(REQUESTS * len(names))]  # interleaved: methods share batches
    params = [SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True, extra_args={"speculative": METHODS[name][0]}) for name in requests]
    outputs = llm.generate([{"prompt_token_ids": PROMPT}] * len(requests), params, use_tqdm=False)
    counts: dict[str, dict] = {name: {} for name in names}
    for name, output in zip(requests, outputs):
        key = tuple(output.outputs[0].token_ids[:2])
        counts[name][key] = counts[name].get(key, 0) + 1
    return counts


@pytest.mark.parametrize("name", list(METHODS))
def test_vllm_emits_the_methods_law(pair, samples, name):
    assert chi_square_pvalue(samples[name], theory(pair, METHODS[name][1]), REQUESTS) > 1e-4


def test_the_law_test_rejects_a_wrong_law(pair, samples):
    assert chi_square_pvalue(samples["static:0.5"], theory(pair, Exact()), REQUESTS) < 1e-6
    assert chi_square_pvalue(samples["exact"], theory(pair, StaticEnsemble(0.5)), REQUESTS) < 1e-6


def test_bad_requests_get_one_clear_error(llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError  # the server answers it with a 400 naming `parameter`

    cases = {
        "speculative.method": {"method": "statc"},
        "speculative.weight": {"method": "static", "weight": 1.5},
        "speculative.wieght": {"method": "static", "wieght": 0.5},
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
