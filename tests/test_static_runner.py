"""The static-cache runner (`--backend torch-static`) and the round's single host sync, on CPU.

The runner must be the eager runner's twin: the same logits and hidden states at every step,
through padded blocks, prompts longer than a block and rollbacks; greedy `exact` must equal the
target's greedy decoding token for token. The round must read the device once: every Python
call that makes the host wait for a tensor (`item`, `tolist`, `int()`, `bool()`, ...) is counted.
The GPU side (CUDA graphs, `torch.cuda.set_sync_debug_mode`) is in tests/test_cuda.py.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch

from diversed.engine import GenerationConfig, speculative_round
from diversed.errors import UserInputError
from diversed.generation import MethodSpec, generate
from diversed.metrics import Metrics
from diversed.models import load_pair
from diversed.runners.static_cache import TORCH_STATIC

STATIC_BACKEND = TORCH_STATIC.name
from diversed.proposers import ModelProposer, NgramProposer
from diversed.runners.hf import TorchRunner
from diversed.runners.static_cache import GraphedModel, StaticCacheRunner
from diversed.sampling import SamplingParams
from diversed.head import DynamicEnsemble
from diversed.verifiers import Exact, SpeculativeCascade, StaticEnsemble, TypicalAcceptance

from .test_engine import hf_greedy
from .test_engine_statistics import random_head

# Python-level calls that copy a device tensor's value to the host (each one a sync on a GPU).
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture(scope="module")
def static_pair(tiny_model_dirs):
    target, draft = tiny_model_dirs
    return load_pair(str(target), str(draft), dtype="float32", backend=STATIC_BACKEND)


@contextlib.contextmanager
def counting_host_reads():
    """Count HOST_READS calls on tensors inside the block (by name)."""
    counts: Counter[str] = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def feeds_agree(eager, static, tokens, num_logits):
    expected_logits, expected_hidden = eager.feed(tokens, num_logits)
    logits, hidden = static.feed(tokens, num_logits)
    assert logits.shape == expected_logits.shape and hidden.shape == expected_hidden.shape
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hidden, expected_hidden, atol=1e-4, rtol=1e-4)
    assert static.length == eager.length


def exercise(eager, static, seed: int = 0) -> None:
    """A prompt longer than a block, then random steps, verifies, catch-ups and rollbacks."""
    rng = torch.Generator().manual_seed(seed)
    tokens = lambda count: torch.randint(5, 60, (count,), generator=rng).tolist()  # noqa: E731
    feeds_agree(eager, static, tokens(23), 1)  # eager path of the static runner, LM head on the last row
    for _ in range(30):
        count = int(torch.randint(1, 13, (1,), generator=rng))  # 1, 2, padded to 9, and > 9 (unpadded)
        feeds_agree(eager, static, tokens(count), int(torch.randint(0, count + 1, (1,), generator=rng)))
        if int(torch.randint(0, 2, (1,), generator=rng)):
            back = static.length - int(torch.randint(0, count + 1, (1,), generator=rng))
            eager.rollback(back)
            static.rollback(back)


@pytest.mark.parametrize("role", ["target", "draft"])
def test_static_runner_equals_the_eager_runner_at_every_step(tiny_pair, role):
    model = tiny_pair.target if role == "target" else tiny_pair.draft
    exercise(TorchRunner(model, tiny_pair.vocab_size), StaticCacheRunner(GraphedModel(model, tiny_pair.vocab_size, context=512)))


def test_the_block_forward_is_one_graph_per_block_size(tiny_pair):
    """Traced by dynamo with fullgraph=True (a graph break fails), the compiled path gives the
    same outputs; on a GPU the same function is captured as CUDA graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphed = GraphedModel(tiny_pair.target, tiny_pair.vocab_size, context=256, compile_mode="trace")
    eager, static = TorchRunner(tiny_pair.target, tiny_pair.vocab_size), StaticCacheRunner(graphed)
    with torch.inference_mode():
        feeds_agree(eager, static, [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], 1)  # a prompt: eager
        for step in range(3):
            feeds_agree(eager, static, [20 + step], 1)  # a step: block 1
            feeds_agree(eager, static, [30 + step, 31, 32, 33], 4)  # a verify: block 9
            eager.rollback(eager.length - 2)
            static.rollback(static.length - 2)
            feeds_agree(eager, static, [40, 41], 2)  # a catch-up: block 2
    assert counters["stats"]["unique_graphs"] == 3  # blocks 1, 9, 2: no recompilation after rollbacks
    torch._dynamo.reset()


def test_static_runner_refuses_to_overflow_its_cache(tiny_pair):
    runner = StaticCacheRunner(GraphedModel(tiny_pair.target, tiny_pair.vocab_size, context=16))
    runner.feed(list(range(5, 20)), 0)
    with pytest.raises(UserInputError, match="holds 16 tokens"):
        runner.feed([5, 6], 1)


def test_the_target_runner_fits_the_longest_verify(static_pair, monkeypatch):
    """A generation sizes the target's verify block by its longest draft (N + 1), not by N_max."""
    assert static_pair.runner("target").block_sizes == (1, 2, 9)
    assert static_pair.runner("target", longest_feed=6).block_sizes == (1, 2, 6)
    blocks, backend_type = [], type(static_pair.backend)
    original = backend_type.runner

    def recording(self, model, vocab_size, longest_feed=None):
        runner = original(self, model, vocab_size, longest_feed)
        blocks.append((model is static_pair.target, runner.max_block))
        return runner

    monkeypatch.setattr(backend_type, "runner", recording)
    generate(static_pair, "count", MethodSpec("exact"), GenerationConfig(max_new_tokens=8, draft_length=5))
    generate(static_pair, "count", MethodSpec("exact"), GenerationConfig(max_new_tokens=8, draft_length=12))
    assert [max_block for is_target, max_block in blocks if is_target] == [6, 13]


@pytest.mark.parametrize("draft_length", [1, 3, 5, 8, 12])
def test_exact_greedy_equals_target_greedy_with_the_static_runner(static_pair, draft_length):
    assert type(static_pair.runner("target")) is StaticCacheRunner
    prompt = static_pair.tokenizer("Hello, world", add_special_tokens=False).input_ids
    config = GenerationConfig(max_new_tokens=60, draft_length=draft_length, sampling=SamplingParams(temperature=0.0), ignore_eos=True)
    ours = generate(static_pair, prompt, MethodSpec("exact"), config)
    assert ours.token_ids == hf_greedy(static_pair.target, prompt, 60)
    assert ours.metrics.accepted < ours.metrics.drafted  # rejections happened: rollbacks were exercised
    assert generate(static_pair, prompt, MethodSpec("ar"), config).token_ids == ours.token_ids


def test_seeded_sampling_is_the_same_on_both_torch_runners(tiny_pair, static_pair):
    config = GenerationConfig(max_new_tokens=40, draft_length=4, seed=3, ignore_eos=True)
    for method in ("exact", "static", "cascade"):
        eager = generate(tiny_pair, "count", MethodSpec(method), config)
        assert generate(static_pair, "count", MethodSpec(method), config).token_ids == eager.token_ids


ROUND_VERIFIERS = {
    "exact": lambda pair: Exact(),
    "static": lambda pair: StaticEnsemble(0.7),
    "diversed": lambda pair: DynamicEnsemble(head=random_head(pair)),
    "cascade": lambda pair: SpeculativeCascade("opt", 0.0),
    "typical": lambda pair: TypicalAcceptance(),
}


@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("name", sorted(ROUND_VERIFIERS))
def test_a_round_reads_the_device_once(static_pair, name, greedy):
    verifier = ROUND_VERIFIERS[name](static_pair)
    params = SamplingParams(temperature=0.0 if greedy else 1.0)
    target, proposer = static_pair.runner("target"), ModelProposer(static_pair.runner("draft"), static_pair.vocab_size)
    committed, metrics, rounds = list(range(5, 25)), Metrics(), 12
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        target.feed(committed[:-1], 0)
        with counting_host_reads() as counts:
            for _ in range(rounds):
                committed += speculative_round(target, proposer, verifier, committed, 4, params, generator, metrics).tokens
    assert metrics.rounds == rounds and metrics.drafted == 4 * rounds
    assert sum(counts.values()) == rounds, counts  # one read per round: the round's summary
    assert counts["tolist"] == rounds


def test_a_prompt_lookup_round_reads_the_device_once(static_pair):
    target, proposer = static_pair.runner("target"), NgramProposer()
    committed, metrics = [5, 6, 7, 8, 5, 6, 7], Metrics()
    with torch.inference_mode():
        target.feed(committed[:-1], 0)
        with counting_host_reads() as counts:
            for _ in range(6):
                committed += speculative_round(target, proposer, Exact(), committed, 3, SamplingParams(), torch.Generator().manual_seed(0), metrics).tokens
    assert sum(counts.values()) == 6, counts


def test_the_read_counter_sees_host_reads():
    """The counter is not blind: each kind of read it watches is counted once."""
    value = torch.tensor(3)
    with counting_host_reads() as counts:
        int(value), float(value), bool(value), value.item(), value.tolist(), [0, 1, 2, 3][value]
    assert counts == Counter({"__int__": 1, "__float__": 1, "__bool__": 1, "item": 1, "tolist": 1, "__index__": 1}), counts


def test_auto_falls_back_to_the_eager_runner_with_a_reason(tiny_pair, monkeypatch):
    model = tiny_pair.target
    monkeypatch.setattr(model.config, "layer_types", ["sliding_attention"] * model.config.num_hidden_layers)
    backend, reason = TORCH_STATIC.settle(model, "tiny", "auto: torch-static on cuda")
    assert backend.name == "torch" and "sliding_attention" in reason and "\n" not in reason
    with pytest.raises(UserInputError, match="--backend torch"):
        TORCH_STATIC.settle(model, "tiny", f"--backend {STATIC_BACKEND}")


def test_the_graphed_model_registry_does_not_keep_a_model_alive(tiny_model_dirs):
    """Benchmarks load one large model after another: a dropped model must free its weights."""
    import gc
    import weakref

    from diversed.runners.static_cache import graphed_model

    pair = load_pair(str(tiny_model_dirs[0]), None, dtype="float32", with_draft=False, backend=STATIC_BACKEND)
    runner = pair.runner("target")
    runner.feed([5, 6, 7], 1)
    assert graphed_model(pair.target, pair.vocab_size) is runner.graphed  # one per model, shared by its runners
    alive = weakref.ref(pair.target)
    del pair, runner
    gc.collect()
    assert alive() is None
