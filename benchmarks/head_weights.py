"""Where an ensemble head puts its weight: w per token on real completions, next to TV(p, q).

Teacher-forces the completions of an evaluation run (`rows.jsonl` of `diversed eval`) through
both models, applies the head at every completion position, and prints how w relates to the
models' disagreement and to the kind of token. For one trajectory the expected accepted
drafts Σ(1 − w·TV) and the bias bound Σ(1 − w)·TV differ by Σ(1 − TV), which w does not
change: a head cannot beat a static weight on that pair of numbers, only on *where* it spends
the bias (on digits, which decide a GSM8K answer, or on words and layout, which do not). The
"share of bias" column shows that; the `static` row spends the same total bias with w fixed.

    python benchmarks/head_weights.py --head runs/train-gsm8k/head --task gsm8k \
        --rows docs/results/gsm8k-50/rows.jsonl --method exact --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

from diversed.evaluate import encodable_examples, teacher_forced
from diversed.head import EnsembleHead, load_head
from diversed.models import ModelPair, load_pair
from diversed.sampling import SamplingParams, total_variation
from diversed.tasks import get_task

KINDS = ("number", "operator", "newline", "word", "other")


def token_kind(text: str) -> str:
    """A coarse class of one decoded token."""
    if re.search(r"\d", text):
        return "number"
    if text.strip() and all(c in "+-*/=×÷$%.,()#" for c in text.strip()):
        return "operator"
    if "\n" in text:
        return "newline"
    if re.search(r"[A-Za-z]", text):
        return "word"
    return "other"


def weights_along(pair: ModelPair, head: EnsembleHead, prompt_ids: list[int], completion_ids: list[int], params: SamplingParams):
    """(w [T], TV [T]) at each completion position, both models teacher-forced."""
    (target_hidden, draft_hidden), (p, q) = teacher_forced(pair, prompt_ids, completion_ids, params)
    with torch.no_grad():
        w = head(draft_hidden, target_hidden)  # [T]
    return w, total_variation(p, q)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", required=True, help="head path or shipped head name")
    parser.add_argument("--task", required=True)
    parser.add_argument("--rows", required=True, type=Path, help="rows.jsonl of a `diversed eval` run on that task")
    parser.add_argument("--method", default="exact", help="whose completions to read (default exact: the target's own distribution)")
    parser.add_argument("--n", type=int, default=None, help="at most this many completions")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--target", default=None)
    parser.add_argument("--draft", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)

    rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["method"] == args.method][: args.n]
    if not rows:
        parser.error(f"no rows of method {args.method!r} in {args.rows}")
    task = get_task(args.task)
    examples = {e.id: e for e in task.load("test", None, args.data_dir)}
    pair = load_pair(args.target, args.draft, dtype=args.dtype)
    head = load_head(args.head, pair.signature())
    prompts = dict((e.id, ids) for e, ids in encodable_examples(pair, task, [examples[r["example_id"]] for r in rows], raw=False)[0])
    params = SamplingParams(temperature=args.temperature)

    rows = [row for row in rows if row["example_id"] in prompts]  # a prompt too long for the context is skipped
    ws, tvs, kinds = [], [], []
    for row in rows:
        completion = pair.tokenizer.encode(row["completion"], add_special_tokens=False)
        w, tv = weights_along(pair, head, prompts[row["example_id"]], completion, params)
        ws.append(w), tvs.append(tv)
        kinds += [token_kind(pair.tokenizer.decode([t])) for t in completion[: len(w)]]
    w, tv = torch.cat(ws), torch.cat(tvs)
    static_w = float(w.mean())  # the static weight with the same mean
    bias, static_bias = (1 - w) * tv, (1 - static_w) * tv
    corr = float(torch.corrcoef(torch.stack([w, tv]))[0, 1]) if w.std() > 0 else float("nan")

    print(f"head {args.head} on {len(rows)} {args.task} completions of {args.method} ({len(w)} tokens)")
    q = torch.quantile(w, torch.tensor([0.05, 0.5, 0.95]))
    print(f"w: mean {w.mean():.3f}, std {w.std():.3f}, 5/50/95% {q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}; corr(w, TV) {corr:+.3f}")
    print(f"per sequence: expected accepted Σ(1-w·TV) {float((1 - w * tv).sum()) / len(rows):.1f}, "
          f"bias Σ(1-w)·TV {float(bias.sum()) / len(rows):.2f} (static w={static_w:.3f}: {float(static_bias.sum()) / len(rows):.2f})")
    print("| token kind | tokens | mean TV | mean w | share of bias (head) | share of bias (static, same mean w) |")
    print("|---|---|---|---|---|---|")
    by_kind = defaultdict(list)
    for i, kind in enumerate(kinds):
        by_kind[kind].append(i)
    for kind in KINDS:
        idx = torch.tensor(by_kind.get(kind, []), dtype=torch.long)
        if len(idx) == 0:
            continue
        print(f"| {kind} | {len(idx)} | {tv[idx].mean():.3f} | {w[idx].mean():.3f} | "
              f"{float(bias[idx].sum() / bias.sum()):.1%} | {float(static_bias[idx].sum() / static_bias.sum()):.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
