"""Lockstep evaluation cost by batch size: seconds of a decoding step of both models, one process.

`diversed eval --lockstep B` steps every row of a batch once per token (evaluate/lockstep.py),
and waiting rows take the places of finished ones, so an evaluation costs about (row-tokens /
B) steps plus one prefill per prompt. On a CPU a step's matrix products cost less per row in a
fuller batch, up to a point where the KV cache's traffic takes over, so the batch size decides
how fast an evaluation runs. For each batch size this prefills B/8 prompts (eight rows each, as
eval's eight methods share a prompt), copies their caches to the B rows, and times steps of
one token per row:

    python benchmarks/lockstep.py --data-dir ../shared/data --batch-sizes 16,32,64,96,128

With `--whole P` it instead generates P prompts' rows end to end, as eval does (real stops, up to
--max-new-tokens), once in separate batches (rows never join a running batch) and once with
refilling, at each batch size, and prints row-tokens per second of each:

    python benchmarks/lockstep.py --data-dir ../shared/data --batch-sizes 32,64 --whole 16

Prompts come from the task's validation split (never the confirmatory examples). Memory grows
with the batch (the float32 pair plus a KV cache per row): watch `free -g` past 128.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from diversed.calibration import machine_summary
from diversed.engine import GenerationConfig
from diversed.evaluate.lockstep import LockstepRow, lockstep_generate
from diversed.generation import MethodSpec, build_verifier, encode_prompt
from diversed.models import load_pair
from diversed.runners.base import left_pad
from diversed.sampling import SamplingParams
from diversed.tasks import get_task

PLAN = json.loads((Path(__file__).resolve().parents[1] / "docs" / "results" / "confirmatory" / "plan.json").read_text())
METHODS = [PLAN["reference"], *PLAN["relaxed"]]  # the confirmatory plan's arms: a prompt's rows
ROWS_PER_PROMPT = len(METHODS)


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


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def whole(pair, task, prompts: list[list[int]], sizes: list[int], max_new_tokens: int) -> None:
    """Row-tokens per second of the same rows, in separate batches and refilled, at each size."""
    specs = [MethodSpec.parse(label) for label in METHODS]
    verifiers = {spec.label: build_verifier(pair, spec) for spec in specs}
    config = GenerationConfig(max_new_tokens, 5, SamplingParams(temperature=1.0), stop=task.stop(False))
    rows = [LockstepRow(None, tuple(prompt), verifiers[spec.label], spec.label, seed)
            for seed, prompt in enumerate(prompts) for spec in specs]
    list(lockstep_generate(pair, rows[:ROWS_PER_PROMPT], replace(config, max_new_tokens=2), batch_size=ROWS_PER_PROMPT))  # one-time costs
    print("| batch | rows | row-tokens | separate batches s | refilled s | row-tokens/s separate | refilled | refilled vs separate |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        tokens: list[int] = []
        separate = timed(lambda: [tokens.append(len(result.token_ids)) for start in range(0, len(rows), size)
                                  for _, result in lockstep_generate(pair, rows[start : start + size], config, batch_size=size)])
        refilled = timed(lambda: list(lockstep_generate(pair, rows, config, batch_size=size)))
        total = sum(tokens)
        print(f"| {size} | {len(rows)} | {total} | {separate:.0f} | {refilled:.0f} | {total / separate:.1f} | {total / refilled:.1f} "
              f"| {separate / refilled:.2f}× |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--task", default="mbpp")
    parser.add_argument("--batch-sizes", default="16,32,64,128", help=f"rows per batch ({ROWS_PER_PROMPT} rows a prompt)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per batch size (the median is printed)")
    parser.add_argument("--whole", type=int, metavar="P", help="generate P prompts' rows end to end instead (see above)")
    parser.add_argument("--max-new-tokens", type=int, default=192, help="with --whole")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--target")
    parser.add_argument("--draft")
    args = parser.parse_args()

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    pair = load_pair(args.target, args.draft, args.dtype, backend="torch")
    task = get_task(args.task)
    count = args.whole or -(-max(sizes) // ROWS_PER_PROMPT)
    prompts = [encode_prompt(pair, task.prompt(example)) for example in task.load("validation", count, args.data_dir)]
    print(f"{machine_summary()}; {torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}; {args.task} validation prompts, "
          f"{ROWS_PER_PROMPT} rows each")
    if args.whole:
        whole(pair, task, prompts, sizes, args.max_new_tokens)
        return 0
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
