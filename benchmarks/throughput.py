"""Evaluation throughput: rows per minute of each batched path on the same rows, side by side in one process.

    python benchmarks/throughput.py --data-dir ../shared/data --task mbpp --n 24 --methods exact,static:0.5
    python benchmarks/throughput.py ... --paths today:16,default:64,default:128 --vllm .venv-vllm

Each path runs `diversed eval`'s row maker on the same examples, methods, seeds and settings
(T = 1, N = --draft-length, --max-new-tokens), into a fresh folder, scoring included, and
prints rows per minute, row-tokens per second and the batch's occupancy:

- `today:B`: lockstep at batch B on the kernels transformers picks by itself (SDPA with
  grouped-query attention as it dispatches it, and a `DynamicCache` that concatenates every
  step): the evaluation path before `runners/torch_decode.py`.
- `unpacked:B`: lockstep at batch B on diversed's attention and KV cache, but with torch's
  plain linear layers (a second copy of the pair, loaded without packed weights).
- `default:B`: lockstep at batch B on diversed's kernels (`runners/torch_decode.py`, packed
  weights where they pay); what `diversed eval` runs by default, at its default batch.
- `--vllm VENV`: `diversed eval --engine vllm` in vLLM's environment, as a subprocess (its
  start-up is counted, and also shown apart).

Then the physical limit: the job's FLOPs (each distinct prompt prefilled once, then every
row-token, through both models) against the machine's measured bfloat16 matrix-product peak. Examples come from the task's validation split (MBPP
511-600; never the confirmatory or held-out examples).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from diversed.calibration import machine_summary
from diversed.evaluate import EvalSettings, LockstepRows, encodable_examples, load_rows, run_eval
from diversed import lockstep
from diversed.generation import MethodSpec
from diversed.models import load_pair
from diversed.runners import torch_decode
from diversed.tasks import get_task


def settings_for(args, task) -> EvalSettings:
    return EvalSettings(task=task.name, split=args.split, target="embedded target", draft="embedded draft", dtype=args.dtype,
                        temperature=1.0, top_k=0, top_p=1.0, draft_length=args.draft_length, max_new_tokens=args.max_new_tokens,
                        seed=0, backend="torch")


@contextlib.contextmanager
def counted_steps(counts: list[int]):
    """Count lockstep steps and the rows in them (counts: [steps, row-steps]) for the time of the block."""
    step = lockstep.Batch.step

    def counting(batch):
        counts[0] += 1
        counts[1] += len(batch.states)
        return step(batch)

    lockstep.Batch.step = counting
    try:
        yield
    finally:
        lockstep.Batch.step = step


def run_path(pair, task, examples, specs, settings, batch: int, today: bool = False) -> dict:
    counts = [0, 0]
    with tempfile.TemporaryDirectory() as folder, torch_decode.transformers_kernels(pair.target, pair.draft) if today else contextlib.nullcontext(), counted_steps(counts):
        started = time.perf_counter()
        run_eval(LockstepRows(pair, batch), task, examples, specs, settings, folder, progress=False)
        seconds = time.perf_counter() - started
        rows = load_rows(Path(folder) / "rows.jsonl")
    return {"rows": len(rows), "seconds": seconds, "row_tokens": sum(row["metrics"]["new_tokens"] for row in rows),
            "quality": sum(r["score"] for r in rows) / len(rows), "occupancy": counts[1] / (batch * counts[0]) if counts[0] else None}


def run_vllm(venv: Path, args) -> dict | str:
    with tempfile.TemporaryDirectory() as folder:
        command = [str(venv / "bin" / "diversed"), "eval", "--engine", "vllm", "--task", args.task, "--split", args.split,
                   "--n", str(args.n), "--methods", args.methods, "--draft-length", str(args.draft_length),
                   "--max-new-tokens", str(args.max_new_tokens), "--temperature", "1", "--out", folder]
        if args.data_dir:
            command += ["--data-dir", str(args.data_dir)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            return f"failed (rc {done.returncode}): {(done.stderr.strip().splitlines() or ['?'])[-1]}"
        rows = load_rows(Path(folder) / "rows.jsonl")
    return {"rows": len(rows), "seconds": seconds, "row_tokens": sum(row["metrics"]["new_tokens"] for row in rows),
            "quality": sum(r["score"] for r in rows) / len(rows), "occupancy": None}


def bf16_peak() -> float:
    """Measured bfloat16 matrix-product FLOP/s at a large batch (the practical peak of this machine's kernels)."""
    layer = torch_decode.fastest_linear(torch.nn.Linear(1536, 8960, bias=False, dtype=torch.bfloat16))
    inputs = torch.randn(512, 1536).bfloat16()
    with torch.inference_mode():
        layer(inputs)
        started = time.perf_counter()
        for _ in range(5):
            layer(inputs)
    return 5 * 2 * 512 * 1536 * 8960 / (time.perf_counter() - started)


def flops_per_row_token(pair, context: int) -> float:
    """Matrix-product FLOPs of one token through both models (LM heads included), attention over `context` tokens included."""
    total = 0.0
    for model in (pair.target, pair.draft):
        config = model.config
        linear = sum(module.in_features * module.out_features
                     for module in model.modules() if isinstance(module, (torch.nn.Linear, torch_decode.PackedLinear)))
        head_dim = config.hidden_size // config.num_attention_heads
        attention = 2 * 2 * config.num_hidden_layers * config.num_attention_heads * head_dim * context
        total += 2 * linear + attention
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--task", default="mbpp")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--methods", default="exact,static:0.5")
    parser.add_argument("--draft-length", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--paths", default="today:16,default:64", help="comma-separated PATH:BATCH, PATH one of today, unpacked, default")
    parser.add_argument("--context", type=int, default=400, help="tokens attended to, for the FLOP count (prompt + completion)")
    parser.add_argument("--vllm", type=Path, metavar="VENV", help="also time `diversed eval --engine vllm` from this venv")
    args = parser.parse_args()

    task = get_task(args.task)
    examples = task.load(args.split, args.n, args.data_dir)
    specs = [MethodSpec.parse(label) for label in args.methods.split(",")]
    pair = load_pair(None, None, args.dtype, backend="torch")
    settings = settings_for(args, task)
    print(f"{machine_summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    print(f"{args.task} {args.split}: {len(examples)} examples x {args.methods}, T = 1, N = {args.draft_length}, "
          f"{args.max_new_tokens} new tokens at most\n")
    run_path(pair, task, examples[:1], specs[:1], settings, 2)  # one-time costs (kernel set-up, sandbox)
    plain_pair = None  # torch's plain linear layers, for the paths before packing; loaded once, if asked for
    print("| path | batch | rows | seconds | rows/min | row-tokens/s | occupancy | mean score | vs first |")
    print("|---|---|---|---|---|---|---|---|---|")
    first = None
    results = []
    for item in args.paths.split(","):
        name, batch = item.split(":")
        if name not in ("today", "unpacked", "default"):
            parser.error(f"unknown path {name!r} in --paths")
        if name != "default" and plain_pair is None:
            with torch_decode.plain_weights():
                plain_pair = load_pair(None, None, args.dtype, backend="torch")
            run_path(plain_pair, task, examples[:1], specs[:1], settings, 2)
        result = run_path(pair if name == "default" else plain_pair, task, examples, specs, settings, int(batch), today=name == "today")
        results.append(result)
        first = first or result
        print(_line(name, batch, result, first), flush=True)
    if args.vllm:
        result = run_vllm(args.vllm, args)
        print(_line("vllm", "-", result, first) if isinstance(result, dict) else f"| vllm | - | {result} |", flush=True)
    context = args.context
    per_token = flops_per_row_token(pair, context)
    peak = bf16_peak()
    # The whole job's work: each distinct prompt prefilled once (a prompt's rows share it), then every row-token.
    prompt_tokens = sum(len(ids) for _, ids in encodable_examples(pair, task, examples, raw=False)[0])
    row_tokens = max(r["row_tokens"] for r in results)
    job = (prompt_tokens + row_tokens) * per_token
    best = min(r["seconds"] for r in results)
    print(f"\nphysical limit: {per_token / 1e9:.2f} GFLOP per token through both models (attention over {context} tokens); "
          f"the job prefills {prompt_tokens} prompt tokens and generates {row_tokens} row-tokens = {job / 1e12:.1f} TFLOP; "
          f"at the measured bf16 matrix peak of {peak / 1e9:.0f} GFLOP/s that is at least {job / peak:.0f} s "
          f"(at most {60 * len(examples) * len(specs) / (job / peak):.1f} rows/min); the fastest path above took {best:.0f} s "
          f"({job / best / 1e9:.0f} GFLOP/s, {job / best / peak:.0%} of the peak)")
    print(json.dumps({"results": results}), file=sys.stderr)
    return 0


def _line(name: str, batch: str, result: dict, first: dict) -> str:
    rows_per_minute = 60 * result["rows"] / result["seconds"]
    occupancy = "–" if result["occupancy"] is None else f"{result['occupancy']:.2f}"
    ratio = rows_per_minute / (60 * first["rows"] / first["seconds"])
    return (f"| {name} | {batch} | {result['rows']} | {result['seconds']:.0f} | {rows_per_minute:.1f} | "
            f"{result['row_tokens'] / result['seconds']:.1f} | {occupancy} | {result['quality']:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
