"""Training rollout throughput: batched lockstep rollouts at several batch shapes, one process.

The RL trainer spends nearly all of its time sampling completions from the ensemble
(docs/training.md). This measures generated tokens per second of `train.rollout_batch` on
the same GSM8K train prompts for each batch size (prompts) and number of samples per prompt
(`--samples-per-prompt`: one prefill per prompt, its cache copied to the samples), so the
gain from batching and from shared prefills is read off one table:

    python benchmarks/rollouts.py --data-dir ../shared/data --batch-sizes 1,4,8 --max-new-tokens 32
    python benchmarks/rollouts.py --data-dir ../shared/data --batch-sizes 4,16 --samples-per-prompt 1,4
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from diversed.generation import encode_prompt
from diversed.head import EnsembleHead, HeadConfig
from diversed.models import load_pair
from diversed.tasks import get_task
from diversed.train import TrainSettings, rollout_batch, seeded_generator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--batch-sizes", default="1,4,8", help="prompts per batch")
    parser.add_argument("--samples-per-prompt", default="1", help="completions per prompt; a row per (batch size, samples)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps")
    parser.add_argument("--target")
    parser.add_argument("--draft")
    args = parser.parse_args()

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    samples = [int(k) for k in args.samples_per_prompt.split(",")]
    pair = load_pair(args.target, args.draft, args.dtype, device=args.device)
    task = get_task(args.task)
    examples = task.load("train", max(sizes), args.data_dir)
    prompts = [encode_prompt(pair, task.prompt(example)) for example in examples]
    head = EnsembleHead(HeadConfig(pair.signature()))
    params = TrainSettings().sampling
    rollout_batch(pair, head, prompts[:1], 2, params, seeded_generator(0, "warm", 0))  # lazy initialisation

    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}; "
          f"{args.task} train prompts ({sum(map(len, prompts)) / len(prompts):.0f} tokens on average), up to {args.max_new_tokens} new tokens")
    print("| prompts | samples per prompt | rollouts | tokens | seconds | tokens/s | vs first row |")
    print("|---|---|---|---|---|---|---|")
    baseline = None
    for size in sizes:
        for k in samples:
            started = time.perf_counter()
            generator = seeded_generator(0, "bench", size * 1000 + k)
            rollouts = rollout_batch(pair, head, prompts[:size], args.max_new_tokens, params, generator, repeats=k)
            seconds = time.perf_counter() - started
            tokens = sum(r.length for r in rollouts)
            rate = tokens / seconds
            baseline = baseline or rate
            print(f"| {size} | {k} | {size * k} | {tokens} | {seconds:.1f} | {rate:.2f} | {rate / baseline:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
