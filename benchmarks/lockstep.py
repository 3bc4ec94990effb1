"""Lockstep evaluation cost by batch size: seconds of a decoding step of both models, one process.

`diversed eval --lockstep B` steps every row of a batch once per token (evaluate/lockstep.py),
and waiting rows take the places of finished ones, so an evaluation costs about (row-tokens /
B) steps plus one prefill per prompt. On a CPU a step's matrix products cost less per row in a
fuller batch, up to a point where the KV cache's traffic takes over, so the batch size decides
how fast an evaluation runs. For each batch size this prefills B/8 prompts (eight rows each, as
eval's eight methods share a prompt), copies their caches to the B rows, and times steps of
one token per row:

    python benchmarks/lockstep.py --data-dir ../shared/data --batch-sizes 16,32,64,96,128

Prompts come from the task's validation split (never the confirmatory examples). Memory grows
with the batch (the float32 pair plus a KV cache per row): watch `free -g` past 128.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from diversed.generation import encode_prompt
from diversed.models import load_pair
from diversed.runners.base import left_pad
from diversed.tasks import get_task

ROWS_PER_PROMPT = 8  # the confirmatory plan's eight methods


def cpu_flags() -> str:
    """The CPU's model name and the vector flags that matter to matrix products (Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    wanted = [f for f in flags if f in {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}]
    return f"{name} ({' '.join(wanted)})"


@torch.inference_mode()
def measure(pair, prompts: list[list[int]], size: int, steps: int) -> tuple[float, float, float]:
    """(prefill seconds, median target step seconds, median draft step seconds) at `size` rows."""
    ids, mask, positions = left_pad(prompts, pair.device)  # [P, L]
    copies = torch.arange(len(prompts)).repeat_interleave(ROWS_PER_PROMPT)[:size]  # [B]
    models = [pair.batch("target"), pair.batch("draft")]
    started = time.perf_counter()
    for model in models:
        model.feed(ids, mask, positions)
    prefill = time.perf_counter() - started
    for model in models:
        model.keep(copies)
    mask, positions = mask[copies], positions[copies][:, -1:]
    seconds: list[list[float]] = [[], []]
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps + 1):  # the first step of a shape pays one-time costs; it is not counted
        mask = torch.cat([mask, mask.new_ones(size, 1)], dim=-1)  # [B, cached + 1]
        positions = positions + 1
        tokens = torch.randint(0, pair.vocab_size, (size, 1), generator=generator)
        for model, record in zip(models, seconds):
            started = time.perf_counter()
            model.feed(tokens, mask, positions)
            record.append(time.perf_counter() - started)
    return prefill, statistics.median(seconds[0][1:]), statistics.median(seconds[1][1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--task", default="mbpp")
    parser.add_argument("--batch-sizes", default="16,32,64,128", help=f"rows per batch ({ROWS_PER_PROMPT} rows a prompt)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per batch size (the median is printed)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--target")
    parser.add_argument("--draft")
    args = parser.parse_args()

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    pair = load_pair(args.target, args.draft, args.dtype, backend="torch")
    task = get_task(args.task)
    count = -(-max(sizes) // ROWS_PER_PROMPT)
    prompts = [encode_prompt(pair, task.prompt(example)) for example in task.load("validation", count, args.data_dir)]
    print(f"{cpu_flags()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}; {args.task} validation prompts, "
          f"{ROWS_PER_PROMPT} rows each")
    print("| rows | prompts (tokens, padded to) | prefill s | target step s | draft step s | ms a row-token | vs first row |")
    print("|---|---|---|---|---|---|---|")
    baseline = None
    for size in sizes:
        chosen = prompts[: -(-size // ROWS_PER_PROMPT)]
        prefill, target, draft = measure(pair, chosen, size, args.steps)
        per_row = (target + draft) / size
        baseline = baseline or per_row
        print(f"| {size} | {len(chosen)} ({sum(map(len, chosen))}, {max(map(len, chosen))}) | {prefill:.1f} | {target:.2f} | {draft:.2f} "
              f"| {per_row * 1e3:.0f} | {baseline / per_row:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
