"""Distil a per-position rule into the paper's ensemble head: can `EnsembleHead` (one linear layer
over the raw last-layer hidden states [h_draft; h_target]) represent a weight that varies along a
response, when it is taught per position instead of by sequence-level RL?

Teacher: speculative cascades' OPT rule at alpha = 0.3 (docs/method.md §4), which is a mixture
whose weight on the target is y_i = 1 where max q < max p - 0.3·TV(p, q) and 0 where it trusts the
draft. Data: every completion (all methods, deduplicated) of the committed guard-selection rows,
GSM8K *train* problems train-0..train-59 and MBPP 601-630, teacher-forced through the embedded
pair (torch, bfloat16, T = 1). A standardised logistic regression of y on [h_draft; h_target] is fitted
on train-0..39 (C by cross-validation grouped by problem), checked on train-40..59 and on MBPP,
folded into an `EnsembleHead` and saved to docs/results/head-distill/cascade-opt-0p3.*.

Per-problem arrays are cached in runs/distill/<task>/<example>.npz, so a cut run resumes. On one
thread of a 2-core EPYC, extraction (227 completions, 25k positions) took about 34 minutes and a
rerun from the cache (fit, save, report) about 1 minute:

    OMP_NUM_THREADS=1 python benchmarks/distill_head.py --data-dir ../shared/data
    OMP_NUM_THREADS=1 python benchmarks/distill_head.py --data-dir ../shared/data --extract-only --minutes 30  # in pieces
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread: the machine is shared with a long evaluation

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diversed.head import TARGET, EnsembleHead, HeadConfig

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"gsm8k": ROOT / "docs/results/guard-selection/gsm8k/rows.jsonl", "mbpp": ROOT / "docs/results/guard-selection/mbpp/rows.jsonl"}
CACHE = ROOT / "runs/distill"
OUT = ROOT / "docs/results/head-distill"
HEAD_NAME = "cascade-opt-0p3"
ALPHA = 0.3
FIT = {f"train-{i}" for i in range(40)}  # GSM8K problems the regression sees; train-40..59 validate
CS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def fold_logistic(mean, scale, coef, intercept: float, config: HeadConfig) -> EnsembleHead:
    """An EnsembleHead whose w equals sigmoid(coef · (x - mean) / scale + intercept), x = [h_draft; h_target].

    The head is softmax([l_draft, l_target])[TARGET] = sigmoid(l_target - l_draft): put the whole
    logit on the target row and leave the draft row at 0 (its zero initialisation).
    """
    coef, mean, scale = (np.asarray(a, dtype=np.float64).ravel() for a in (coef, mean, scale))
    head = EnsembleHead(config)
    with torch.no_grad():
        head.linear.weight[TARGET] = torch.from_numpy(coef / scale)
        head.linear.bias[TARGET] = float(intercept - np.sum(coef * mean / scale))  # folded in float64, stored float32
    return head.eval()


# ---------------------------------------------------------------- extraction (teacher forcing)

def completions(task_name: str) -> dict[str, list[str]]:
    """example id -> its distinct completion texts (all methods), in file order."""
    by: dict[str, list[str]] = {}
    for line in ROWS[task_name].read_text().splitlines():
        row = json.loads(line)
        if task_name == "gsm8k":
            assert row["example_id"].startswith("train-"), row["example_id"]  # never a GSM8K test problem
        texts = by.setdefault(row["example_id"], [])
        if row["completion"] not in texts:
            texts.append(row["completion"])
    return by


def extract(pair, task_name: str, data_dir: str | None, deadline: float) -> bool:
    """Cache each problem's per-position arrays; True when every problem of the task is cached."""
    from diversed.evaluate import encodable_examples, teacher_forced
    from diversed.sampling import SamplingParams, total_variation
    from diversed.tasks import get_task
    from diversed.verifiers import CASCADE_RULES

    task = get_task(task_name)
    wanted = completions(task_name)
    # Both row files come from `diversed eval --split train` (their settings.json), prompt built as there.
    examples = [e for e in task.load("train", None, data_dir) if e.id in wanted]
    prompts, skipped = encodable_examples(pair, task, examples, raw=False)
    assert not skipped and len(prompts) == len(wanted), (skipped, len(prompts))
    params = SamplingParams(temperature=1.0)
    folder = CACHE / task_name
    folder.mkdir(parents=True, exist_ok=True)
    for example, prompt_ids in prompts:
        path = folder / f"{example.id}.npz"
        if path.exists():
            continue
        if time.time() > deadline:
            return False
        started, arrays = time.time(), []
        for k, text in enumerate(wanted[example.id]):
            ids = pair.tokenizer.encode(text, add_special_tokens=False)
            if not ids:
                continue
            # `teacher_forced` runs TorchRunner.feed, the engine's own call: `last` hidden states (bf16
            # cast to float32, which is what EnsembleHead.forward does too) and logits[:, :vocab] -> T=1 probs.
            (h_target, h_draft), (p, q) = teacher_forced(pair, prompt_ids, ids, params)
            defer = CASCADE_RULES["opt"](p, q, ALPHA)  # the engine's rule: trust the draft here
            arrays.append(dict(h_draft=h_draft.numpy(), h_target=h_target.numpy(), y=(~defer).numpy().astype(np.int8),
                               tv=total_variation(p, q).numpy(), completion=np.full(len(ids), k, np.int16)))
        merged = {key: np.concatenate([a[key] for a in arrays]) for key in arrays[0]}
        np.savez(path, **merged)
        print(f"{task_name} {example.id}: {len(wanted[example.id])} completions, {len(merged['y'])} positions, "
              f"{time.time() - started:.0f} s", flush=True)
    return True


def load_task(task_name: str) -> dict[str, np.ndarray]:
    """Every cached position of a task, with the problem id of each."""
    parts, problems = [], []
    for path in sorted((CACHE / task_name).glob("*.npz")):
        with np.load(path) as f:
            parts.append({k: f[k] for k in f.files})
        problems += [path.stem] * len(parts[-1]["y"])
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    data["problem"] = np.array(problems)
    data["x"] = np.concatenate([data.pop("h_draft"), data.pop("h_target")], axis=1)  # the head's input order
    return data


# ---------------------------------------------------------------- fitting and report

def stats(w: np.ndarray, data: dict) -> dict:
    from sklearn.metrics import log_loss, roc_auc_score

    y, tv = data["y"], data["tv"]
    response = np.char.add(data["problem"].astype(str), data["completion"].astype(str) + "/")
    # Spread inside one response (mean of per-response stds): a w that only moved between problems
    # would be a per-problem constant, not the per-position weight the question is about.
    within = np.mean([w[response == r].std() for r in np.unique(response)])
    return {"positions": len(y), "share_y1": y.mean(), "rule_std": y.std(), "w_mean": w.mean(), "w_std": w.std(),
            "w_std_within": within, "auc": roc_auc_score(y, w), "accuracy": ((w >= 0.5) == y).mean(),
            "log_loss": log_loss(y, np.clip(w, 1e-6, 1 - 1e-6)), "corr_w_tv": np.corrcoef(w, tv)[0, 1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("DIVERSED_DATA_DIR"))
    parser.add_argument("--minutes", type=float, default=None, help="stop extraction after this long (resumable)")
    parser.add_argument("--extract-only", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    deadline = started + 60 * args.minutes if args.minutes else float("inf")

    from diversed.models import load_pair

    pair = load_pair(None, None, "bfloat16", backend="torch")
    signature = pair.signature()
    done = all([extract(pair, name, args.data_dir, deadline) for name in ("gsm8k", "mbpp")])
    if not done or args.extract_only:
        print("extraction " + ("complete" if done else "cut short: rerun to resume"))
        return 0

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    gsm, mbpp = load_task("gsm8k"), load_task("mbpp")
    in_fit = np.isin(gsm["problem"], sorted(FIT))
    fit, val = ({k: v[mask] for k, v in gsm.items()} for mask in (in_fit, ~in_fit))
    # C by 5-fold CV grouped by problem (positions of one response are far from independent); scored
    # by log-loss, since w is used as a probability-like mixture weight, not only as a ranking.
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    search = GridSearchCV(model, {"logisticregression__C": list(CS)}, cv=GroupKFold(5), scoring="neg_log_loss")
    search.fit(fit["x"], fit["y"], groups=fit["problem"])
    best = search.best_estimator_
    C = search.best_params_["logisticregression__C"]
    cv_table = ", ".join(f"{c:g}: {s:.4f}" for c, s in zip(CS, search.cv_results_["mean_test_score"]))
    print(f"C = {C:g} (CV mean log-loss by C: {cv_table})")

    scaler, logreg = best.named_steps["standardscaler"], best.named_steps["logisticregression"]
    extra = {"task": "gsm8k", "distillation": {
        "script": "benchmarks/distill_head.py", "teacher": f"cascade:opt:{ALPHA:g}", "alpha": ALPHA, "C": C,
        "data": "completions of docs/results/guard-selection/gsm8k/rows.jsonl (all methods, deduplicated), T=1",
        "fit_problems": "gsm8k train-0..train-39", "validation_problems": "gsm8k train-40..train-59",
        "cross_task_test": "mbpp 601-630 (docs/results/guard-selection/mbpp/rows.jsonl)", "fit_positions": int(len(fit["y"]))}}
    try:
        from diversed.train.loop import git_commit
        extra["git_commit"] = git_commit()
    except ImportError:
        pass
    saved = fold_logistic(scaler.mean_, scaler.scale_, logreg.coef_, float(logreg.intercept_[0]), HeadConfig(signature, extra)).save(OUT / HEAD_NAME)
    assert saved == OUT / f"{HEAD_NAME}.safetensors", saved

    from diversed.head import load_head

    def head_w(head, data):
        n_draft = signature.draft_hidden_size
        with torch.no_grad():
            x = torch.from_numpy(data["x"])
            return head(x[:, :n_draft], x[:, n_draft:]).numpy().astype(np.float64)

    head = load_head(OUT / HEAD_NAME, signature)
    diff = np.abs(head_w(head, val) - best.predict_proba(val["x"])[:, 1]).max()
    print(f"reloaded head vs regression on the validation positions: max |w - P(y=1)| = {diff:.2e}")
    assert diff < 1e-4, diff

    rows = [("distilled", name, stats(head_w(head, d), d)) for name, d in (("fit (GSM8K 0-39)", fit), ("GSM8K val (40-59)", val), ("MBPP test", mbpp))]
    for shipped in ("gsm8k", "mbpp"):
        rl = load_head(shipped, signature)
        rows += [(f"RL `{shipped}`", name, stats(head_w(rl, d), d)) for name, d in (("GSM8K val (40-59)", val), ("MBPP test", mbpp))]
    header = ("| head | split | positions | share y=1 | rule std(y) | w mean | w std | w std within response | ROC-AUC | "
              "accuracy (w≥0.5) | log-loss | corr(w, TV) |\n|" + "---|" * 12)
    table = "\n".join(f"| {h} | {name} | {s['positions']} | {s['share_y1']:.3f} | {s['rule_std']:.3f} | {s['w_mean']:.3f} | "
                      f"{s['w_std']:.3f} | {s['w_std_within']:.3f} | {s['auc']:.3f} | {s['accuracy']:.3f} | {s['log_loss']:.3f} | "
                      f"{s['corr_w_tv']:+.3f} |" for h, name, s in rows)
    print(header + "\n" + table)
    from sklearn.metrics import log_loss, roc_auc_score

    for name, d in (("GSM8K val", val), ("MBPP test", mbpp)):  # references a head has to beat
        print(f"{name}: log-loss of the constant w = fit share of y=1 ({fit['y'].mean():.3f}): "
              f"{log_loss(d['y'], np.full(len(d['y']), fit['y'].mean())):.3f}; ROC-AUC of TV alone: {roc_auc_score(d['y'], d['tv']):.3f}, "
              f"corr(y, TV) {np.corrcoef(d['y'], d['tv'])[0, 1]:+.3f}")
    from diversed.calibration import machine_summary

    print(f"machine: {machine_summary()}, {torch.get_num_threads()} thread(s); this run {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
