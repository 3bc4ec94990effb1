"""Step costs on an accelerator, eager runner against the static-cache runner, with random weights.

Timing does not need trained weights: this builds models of the embedded pair's architectures
(Qwen2.5-Coder-1.5B target, -0.5B draft) and larger Qwen2.5 targets (7B, 14B, 32B) with the
0.5B draft, with random weights made on the device, and measures through each torch runner
(`torch`: eager, DynamicCache; `torch-static`: static KV cache, CUDA graphs on a GPU):

- the target step, the draft step, c = draft step / target step and v(k), k = 1..N_max + 1;
- for the embedded pair's architectures, the engine's rounds (ar and exact at fixed N) with
  the split draft / target / other;
- projected tokens/s and speed-ups of methods at the acceptance measured on CPU with the real
  weights (read from docs/results summaries, named in the output), with docs/method.md §6's
  formula for i.i.d. acceptance a per position,

      speedup(N) = (1 - a^(N+1)) / ((1 - a) (N c + v(N + 1))),

  at the N the draft-length policy (`--draft-length auto`) would choose for those costs.

A summary's acceptance is accepted / drafted at its fixed N; the i.i.d. a is the one that
gives that fraction at that N. Speed-ups are over the same runner's plain decoding and, for
`torch-static`, over graphed plain decoding.

    python benchmarks/gpu_costs.py --device cuda --json costs.json           # a GPU
    python benchmarks/gpu_costs.py --device cpu --targets tiny --dtype float32  # a smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

from diversed.calibration import machine_summary, measure_seconds
from diversed.draft_length import AdaptiveDraftLength, FixedDraftLength, verify_costs_from_seconds
from diversed.engine import GenerationConfig, decode
from diversed.metrics import Metrics
from diversed.models import ModelPair
from diversed.runners import BACKENDS
from diversed.runners.static_cache import TORCH_STATIC

STATIC_BACKEND = TORCH_STATIC.name
from diversed.proposers import ModelProposer
from diversed.runners.static_cache import COMPILE_MODES, graphed_model
from diversed.sampling import SamplingParams
from diversed.verifiers import Exact

REPO = Path(__file__).resolve().parents[1]
RUNNERS = (STATIC_BACKEND, "torch")  # graphed first: the eager projections are also put against graphed ar
# Architectures (their config.json, less the weights). Qwen2.5-7B/14B/32B: the base models'.
QWEN_CODER = dict(num_key_value_heads=2, vocab_size=151936)
QWEN_LARGE = dict(vocab_size=152064)
ARCHITECTURES = {
    "Qwen2.5-Coder-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, **QWEN_CODER),
    "Qwen2.5-Coder-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, **QWEN_CODER),
    "Qwen2.5-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, **QWEN_LARGE),
    "Qwen2.5-14B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, **QWEN_LARGE),
    "Qwen2.5-32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, **QWEN_LARGE),
    # A smoke-test pair small enough for a CPU.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
    "tiny-draft": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
}
SHARED = dict(tie_word_embeddings=False, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6)
DRAFT_OF = {"tiny": "tiny-draft"}  # every other target is drafted by the embedded pair's draft
DEFAULT_DRAFT = "Qwen2.5-Coder-0.5B"
PAIR_TARGET = "Qwen2.5-Coder-1.5B"
# Methods projected, and the summaries their CPU-measured acceptance is read from.
METHODS = ("exact", "static:0.9", "cascade:opt:0", "diversed:")
SUMMARIES = ("docs/results/mbpp-issue15/summary.md", "docs/results/gsm8k-issue15/summary.md")


def random_model(name: str, device: str, dtype: torch.dtype):
    """A Qwen2 causal LM of architecture `name`, random weights made directly on `device` in `dtype`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**ARCHITECTURES[name], **SHARED)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    return model.eval().requires_grad_(False)


def summary_acceptances(path: Path) -> tuple[int, dict[str, float]]:
    """(N the runs drafted, {method label: accepted / drafted}) from a results summary and its settings."""
    draft_length = int(json.loads((path.parent / "settings.json").read_text())["draft_length"])
    rates: dict[str, float] = {}
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) > 4 and re.fullmatch(r"\d+(\.\d+)?%", cells[4]):
            rates[cells[0]] = float(cells[4].rstrip("%")) / 100
    return draft_length, rates


def iid_acceptance(rate: float, n: int) -> float:
    """The per-position acceptance a whose expected accepted fraction at N = n, sum_i a^i / n, is `rate`."""
    low, high = 0.0, 1.0
    for _ in range(60):
        a = (low + high) / 2
        low, high = (a, high) if sum(a ** i for i in range(1, n + 1)) / n < rate else (low, a)
    return (low + high) / 2


def cpu_acceptances(root: Path) -> list[dict]:
    """Rows {source, method, rate, n, a} for METHODS from SUMMARIES (the head: the task's own)."""
    rows = []
    for relative in SUMMARIES:
        path = root / relative
        if not path.is_file():
            continue
        n, rates = summary_acceptances(path)
        task = path.parent.name.split("-")[0]
        for method in METHODS:
            label = f"diversed:{task}" if method == "diversed:" else method
            if label in rates:
                rows.append(dict(source=relative, method=label, rate=rates[label], n=n, a=iid_acceptance(rates[label], n)))
    return rows


def speedup(a: float, n: int, c: float, v: list[float]) -> float:
    """Expected tokens per target-step time at N = n (v[k - 1] = v(k)); N = 0 is 1."""
    if n == 0:
        return 1.0
    return (1 - a ** (n + 1)) / ((1 - a) * (n * c + v[n]))


def engine_run(pair: ModelPair, n: int | None, tokens: int) -> Metrics:
    """One decode of `tokens` tokens from a 64-token prompt: ar (n None) or exact at N = n."""
    metrics = Metrics()
    config = GenerationConfig(tokens, n or 1, SamplingParams(1.0), seed=0, ignore_eos=True)
    proposer = ModelProposer(pair.runner("draft"), pair.vocab_size) if n else None
    prompt = [(13 * i + 7) % min(pair.vocab_size, 1000) for i in range(64)]
    for _ in decode(pair.runner("target"), proposer, prompt, Exact() if n else None, config, metrics=metrics,
                    policy=FixedDraftLength(n) if n else None):
        pass
    if pair.device.type == "cuda":
        torch.cuda.synchronize()
    return metrics


def measure(pair: ModelPair, max_tokens: int, repeats: int) -> dict:
    """Step costs of one pair on its runner (graphs are captured in measure_seconds's warm-up)."""
    seconds = measure_seconds(pair, max_tokens, repeats=repeats)
    costs = verify_costs_from_seconds(seconds["target_step"], seconds["draft_step"], seconds["verify"])
    return dict(seconds=seconds, c=costs.c, v=list(costs.verify))


def project(result: dict, ar_step: float, acceptances: list[dict], max_draft_length: int) -> list[dict]:
    """Per method: the policy's N, projected tokens/s and speed-ups over this runner's and over `ar_step`'s plain decoding."""
    from diversed.draft_length import StepCosts

    costs = StepCosts(result["c"], tuple(result["v"]))
    step = result["seconds"]["target_step"]
    rows = []
    for row in acceptances:
        policy = AdaptiveDraftLength(costs, max_draft_length, prior_acceptance=row["a"])
        n = policy.best_length(policy.max_draft_length)
        gain = speedup(row["a"], n, costs.c, list(costs.verify))
        rows.append(dict(row, policy_n=n, speedup=gain, tokens_per_second=gain / step, speedup_over_graphed_ar=gain * ar_step / step))
    return rows


def print_costs(label: str, runner: str, result: dict) -> None:
    s = result["seconds"]
    print(f"\n{label}, {runner}: target step {s['target_step'] * 1000:.3f} ms, draft step {s['draft_step'] * 1000:.3f} ms, c = {result['c']:.3f}")
    print("v(k), k = 1..: " + ", ".join(f"{x:.2f}" for x in result["v"]))


def print_projection(rows: list[dict]) -> None:
    print("| acceptance from | method | accepted/drafted (N) | i.i.d. a | policy N | tok/s | speed-up | over graphed ar |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['source']} | {r['method']} | {r['rate']:.1%} ({r['n']}) | {r['a']:.3f} | {r['policy_n']} | "
              f"{r['tokens_per_second']:.1f} | {r['speedup']:.2f}x | {r['speedup_over_graphed_ar']:.2f}x |")


def print_engine_runs(runs: dict[str, Metrics]) -> None:
    print("| run | tok/s | acceptance (random weights) | draft / target / other |")
    print("|---|---|---|---|")
    for label, m in runs.items():
        split = f"{m.draft_seconds / m.seconds:.0%} / {m.target_seconds / m.seconds:.0%} / {m.other_seconds / m.seconds:.1%}"
        acceptance = "–" if m.acceptance_rate is None else f"{m.acceptance_rate:.1%}"
        print(f"| {label} | {m.tokens_per_second:.1f} | {acceptance} | {split} |")


def environment(device: str) -> dict:
    import transformers

    where = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else machine_summary()
    return dict(device=where, torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,
                python=platform.python_version())


ENGINE_DRAFT_LENGTHS = (1, 4, 8)


def engine_runs(pair: ModelPair, tokens: int, max_draft_length: int) -> dict[str, Metrics]:
    engine_run(pair, None, 8)  # warm-up
    runs = {"ar": engine_run(pair, None, tokens)}
    for n in ENGINE_DRAFT_LENGTHS:
        if n <= max_draft_length:
            engine_run(pair, n, 8)  # captures the shapes this N uses
            runs[f"exact@{n}"] = engine_run(pair, n, tokens)
    return runs


def measure_target(target_name: str, draft, args, dtype, acceptances, entry: dict, save) -> None:
    """Each runner on one target with `draft`; `entry` is filled and `save`d as results come."""
    started = time.perf_counter()
    target = random_model(target_name, args.device, dtype)
    print(f"\n## {target_name} target, {entry['draft']} draft (random weights, built in {time.perf_counter() - started:.1f} s)", flush=True)
    vocab_size = min(model.get_output_embeddings().out_features for model in (target, draft))
    for model in (target, draft):
        graphed_model(model, vocab_size, args.compile_mode)  # the static runners' compile mode
    for runner in args.runners.split(","):
        pair = ModelPair(target, draft, None, f"{target_name} (random)", f"{entry['draft']} (random)", BACKENDS[runner])
        started = time.perf_counter()
        result = entry[runner] = measure(pair, args.max_draft_length + 1, args.repeats)
        result["measure_seconds"] = time.perf_counter() - started  # graph captures included
        print_costs(target_name, runner, result)
        if target_name in (PAIR_TARGET, "tiny") and args.tokens:
            runs = engine_runs(pair, args.tokens, args.max_draft_length)
            print_engine_runs(runs)
            result["engine"] = {label: m.to_dict() for label, m in runs.items()}
        graphed_ar = entry.get(STATIC_BACKEND, result)["seconds"]["target_step"]
        result["projection"] = project(result, graphed_ar, acceptances, args.max_draft_length)
        print(f"\nprojection, {runner} ({target_name}):")
        print_projection(result["projection"])
        save()
        del pair
    del target
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--targets", default=f"{PAIR_TARGET},Qwen2.5-7B,Qwen2.5-14B,Qwen2.5-32B",
                        help=f"comma-separated targets: {', '.join(a for a in ARCHITECTURES if a not in DRAFT_OF.values())}")
    parser.add_argument("--runners", default=",".join(RUNNERS), help="comma-separated torch runners (backends) to measure")
    parser.add_argument("--compile-mode", default="auto", choices=COMPILE_MODES,
                        help="how the static-cache runner compiles its block forward (auto: reduce-overhead on CUDA)")
    parser.add_argument("--max-draft-length", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per timed engine run (the pair only; 0: none)")
    parser.add_argument("--budget-seconds", type=float, default=float("inf"), help="start no new target after this")
    parser.add_argument("--json", help="write the results here (rewritten after each target)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    acceptances = cpu_acceptances(REPO)
    out: dict = {"environment": environment(args.device), "acceptance_sources": list(SUMMARIES), "targets": {}}
    print("environment: " + ", ".join(f"{k} {v}" for k, v in out["environment"].items()), flush=True)
    drafts: dict = {}  # one draft model per architecture, shared by its targets (and its captured graphs)

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))

    for target_name in args.targets.split(","):
        if time.perf_counter() - started > args.budget_seconds:
            print(f"\n(skipped {target_name}: past the {args.budget_seconds:.0f} s budget)", flush=True)
            out["targets"][target_name] = {"skipped": "time budget"}
            continue
        draft_name = DRAFT_OF.get(target_name, DEFAULT_DRAFT)
        if draft_name not in drafts:
            drafts[draft_name] = random_model(draft_name, args.device, dtype)
        entry = out["targets"][target_name] = {"draft": draft_name, "compile_mode": args.compile_mode}
        measure_target(target_name, drafts[draft_name], args, dtype, acceptances, entry, save)
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
