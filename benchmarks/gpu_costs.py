"""Step costs of the default pair's architecture on an accelerator, with random weights.

Timing does not need trained weights: this builds Qwen2.5-Coder-1.5B (target) and -0.5B (draft)
shaped models with random weights directly on the device, measures c (draft step / target
step) and v(k) (k-token verification / target step) through the torch runner, times the
engine's rounds (ar and exact at fixed N, and the split draft / target / other), and projects
the speedup of each N from an acceptance rate measured elsewhere (e.g. on a CPU with the real
weights), with docs/method.md §6's formula for i.i.d. acceptance:

    speedup(N) = (1 - a^(N+1)) / ((1 - a) (N c + v(N + 1)))

    python benchmarks/gpu_costs.py --device cuda --acceptance 0.72,0.84
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from diversed.calibration import measure_seconds
from diversed.draft_length import FixedDraftLength
from diversed.engine import GenerationConfig, decode
from diversed.metrics import Metrics
from diversed.models import ModelPair
from diversed.proposers import ModelProposer
from diversed.sampling import SamplingParams
from diversed.verifiers import Exact

# The embedded pair's architectures (their config.json, less the weights).
ARCHITECTURES = {
    "Qwen2.5-Coder-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12),
    "Qwen2.5-Coder-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14),
}
SHARED = dict(num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=32768,
              rms_norm_eps=1e-6, rope_theta=1e6)


def random_model(name: str, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**ARCHITECTURES[name], **SHARED)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model.eval().requires_grad_(False)


def engine_run(pair: ModelPair, n: int | None, tokens: int) -> Metrics:
    """One decode of `tokens` tokens from a 64-token prompt: ar (n None) or exact at N = n."""
    metrics = Metrics()
    config = GenerationConfig(tokens, n or 1, SamplingParams(1.0), seed=0, ignore_eos=True)
    proposer = ModelProposer(pair.runner("draft"), pair.vocab_size) if n else None
    prompt = [(13 * i + 7) % 1000 for i in range(64)]
    for _ in decode(pair.runner("target"), proposer, prompt, Exact() if n else None, config, metrics=metrics,
                    policy=FixedDraftLength(n) if n else None):
        pass
    if pair.device.type == "cuda":
        torch.cuda.synchronize()
    return metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--max-draft-length", type=int, default=8)
    parser.add_argument("--acceptance", default="0.7", help="comma-separated acceptance rates to project with")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per timed engine run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    target, draft = random_model("Qwen2.5-Coder-1.5B", args.device, dtype), random_model("Qwen2.5-Coder-0.5B", args.device, dtype)
    pair = ModelPair(target, draft, None, "Qwen2.5-Coder-1.5B (random)", "Qwen2.5-Coder-0.5B (random)")
    print(f"models built in {time.perf_counter() - started:.1f} s on {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}",
          file=sys.stderr)
    seconds = measure_seconds(pair, args.max_draft_length + 1, repeats=9)
    step = seconds["target_step"]
    c, v = seconds["draft_step"] / step, [s / step for s in seconds["verify"]]
    print(f"target step {step * 1000:.2f} ms, draft step {seconds['draft_step'] * 1000:.2f} ms, c = {c:.3f}")
    print("v(k), k = 1..: " + ", ".join(f"{x:.2f}" for x in v))
    engine_run(pair, None, 8)  # warm-up
    runs = {"ar": engine_run(pair, None, args.tokens)}
    for n in (1, 2, 3, 4, 5, 6, 8):
        if n <= args.max_draft_length:
            runs[f"exact@{n}"] = engine_run(pair, n, args.tokens)
    print("| run | tok/s | acceptance (random weights) | draft / target / other |")
    print("|---|---|---|---|")
    for label, m in runs.items():
        split = f"{m.draft_seconds / m.seconds:.0%} / {m.target_seconds / m.seconds:.0%} / {m.other_seconds / m.seconds:.1%}"
        acceptance = "–" if m.acceptance_rate is None else f"{m.acceptance_rate:.1%}"
        print(f"| {label} | {m.tokens_per_second:.1f} | {acceptance} | {split} |")
    rates = [float(a) for a in args.acceptance.split(",")]
    print("| acceptance | " + " | ".join(f"N={n}" for n in range(1, args.max_draft_length + 1)) + " | best |")
    print("|---|" + "---|" * (args.max_draft_length + 1))
    projection = {}
    for a in rates:
        speedups = [(1 - a ** (n + 1)) / ((1 - a) * (n * c + v[n])) for n in range(1, args.max_draft_length + 1)]
        best = max(range(len(speedups)), key=speedups.__getitem__)
        projection[a] = speedups
        print(f"| {a:.3f} | " + " | ".join(f"{s:.2f}" for s in speedups) + f" | N={best + 1}: {speedups[best]:.2f}x |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"c": c, "v": v, "seconds": seconds, "projection": projection,
                       "runs": {k: m.to_dict() for k, m in runs.items()}}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
