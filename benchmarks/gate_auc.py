"""Offline gate (issue 15): can anything rank harmful mismatches better than one statistic?

Reads a `diversed mine` folder and, on held-out *problems* (a seeded split, so no problem's
positions are on both sides), reports ROC-AUC for predicting that a mismatch is "important":

- `flip`: the counterfactual (draft token substituted, target continues greedily) changes
  the task outcome;
- `flip_vs_control`: the same against a greedy continuation from the original token (runs
  mined with --control only);
- `lldrop`: substituting the draft token lowers the target's log-likelihood of the original
  continuation by more than --delta nats (default 2: a drop that makes the original rest
  e^2 ≈ 7 times less likely is one the target clearly "notices"; sweep it).

Rows: every scalar statistic alone, sign-oriented on the training problems (direction `+`:
a higher value means more likely important; `−`: lower), so AUC >= 0.5 means it ranks well
and the held-out AUC is honest; then standardised logistic regressions on all scalar
features (plus token-class one-hots), on the hidden-state projections alone (the paper's
head's inputs) and on both. KL and margin features enter the regressions as log1p(x), which
tames their heavy tails; single-statistic AUCs do not change under such monotone maps.
Intervals: a bootstrap over held-out problems (positions within a problem are correlated).

    python benchmarks/gate_auc.py --records runs/mine-gsm8k [--json gate.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from diversed.errors import UserInputError
from diversed.features import log1p_columns
from diversed.mining import DEFAULT_DELTA, TOKEN_CLASSES, importance_labels as labels, load_positions

MIN_CLASS_COUNT = 2  # fewer held-out positives (or negatives) than this: the AUC is not reported


def scalar_matrix(arrays: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    """Scalar features for the regressions: [P, F + classes], log1p on heavy-tailed ones."""
    features = log1p_columns(arrays["features"], arrays["feature_names"])  # [P, F]
    one_hot = np.eye(len(TOKEN_CLASSES))[arrays["token_class"]]  # [P, classes]
    return np.concatenate([features, one_hot], axis=1), list(arrays["feature_names"]) + [f"class={c}" for c in TOKEN_CLASSES]


def split_problems(n_problems: int, holdout: float, seed: int) -> np.ndarray:
    """[n_problems] bool: True for held-out problems (at least one on each side)."""
    order = np.random.default_rng(seed).permutation(n_problems)
    n_test = min(max(1, round(holdout * n_problems)), n_problems - 1)
    held_out = np.zeros(n_problems, dtype=bool)
    held_out[order[:n_test]] = True
    return held_out


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def bootstrap_ci(y: np.ndarray, score: np.ndarray, problem: np.ndarray, resamples: int, seed: int) -> tuple[float, float] | None:
    """95% interval of the AUC, resampling held-out problems with replacement (None: not enough data)."""
    if resamples <= 0:
        return None
    rng = np.random.default_rng(seed)
    groups = [np.nonzero(problem == p)[0] for p in np.unique(problem)]
    values = []
    for _ in range(resamples):
        rows = np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])
        value = _auc(y[rows], score[rows])
        if not np.isnan(value):
            values.append(value)
    if len(values) < resamples // 2:
        return None
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def _logistic_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    model.fit(x_train, y_train)
    return model.predict_proba(x_test)[:, 1]


def gate_report(arrays: dict[str, Any], label: str, *, delta: float = DEFAULT_DELTA, holdout: float = 0.3,
                seed: int = 0, resamples: int = 1000) -> dict[str, Any]:
    """AUC of every statistic and model for one label, trained and tested on a problem split."""
    y_all = labels(arrays, label, delta)
    has_label = ~np.isnan(y_all)
    held_out = split_problems(len(arrays["problem_ids"]), holdout, seed)[arrays["problem"]]  # [P]
    train, test = has_label & ~held_out, has_label & held_out
    y_train, y_test = y_all[train], y_all[test]
    report: dict[str, Any] = {
        "label": label, "delta": delta if label == "lldrop" else None, "holdout": holdout, "seed": seed,
        "train_positions": int(train.sum()), "train_positives": int(y_train.sum()),
        "test_positions": int(test.sum()), "test_positives": int(y_test.sum()), "rows": [],
    }
    enough = min(y_test.sum(), len(y_test) - y_test.sum()) >= MIN_CLASS_COUNT and 0 < y_train.sum() < len(y_train)
    if not enough:
        report["note"] = "too few positives or negatives on one side of the split to report AUCs"
        return report
    problem_test = arrays["problem"][test]

    def add(name: str, direction: str, score: np.ndarray) -> None:
        ci = bootstrap_ci(y_test, score, problem_test, resamples, seed)
        report["rows"].append({"name": name, "direction": direction, "auc": _auc(y_test, score), "ci": ci})

    for column, name in enumerate(arrays["feature_names"]):
        feature = arrays["features"][:, column]
        sign = 1.0 if _auc(y_train, feature[train]) >= 0.5 else -1.0  # chosen on training problems only
        add(name, "+" if sign > 0 else "−", sign * feature[test])
    scalars, _ = scalar_matrix(arrays)
    hidden = np.concatenate([arrays["target_projection"], arrays["draft_projection"]], axis=1)  # [P, 2 * dims]
    for name, matrix in (("logistic: scalars", scalars), ("logistic: hidden projections", hidden),
                         ("logistic: scalars + hidden", np.concatenate([scalars, hidden], axis=1))):
        add(name, "", _logistic_scores(matrix[train], y_train, matrix[test]))
    return report


def markdown(report: dict[str, Any]) -> str:
    title = report["label"] + (f" (δ = {report['delta']:g} nats)" if report["delta"] is not None else "")
    head = (f"### important = {title}: train {report['train_positives']}/{report['train_positions']}, "
            f"held out {report['test_positives']}/{report['test_positions']} positive")
    if not report["rows"]:
        return f"{head}\n\n{report.get('note', '')}\n"
    lines = [head, "", "| predictor | direction | AUC | 95% CI |", "|---|---|---|---|"]
    for row in report["rows"]:
        ci = "n/a" if row["ci"] is None else f"{row['ci'][0]:.3f}–{row['ci'][1]:.3f}"
        lines.append(f"| {row['name']} | {row['direction']} | {row['auc']:.3f} | {ci} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True, help="a `diversed mine --out` folder")
    parser.add_argument("--labels", default="flip,lldrop", help="comma-separated: flip, flip_vs_control, lldrop (default %(default)s)")
    parser.add_argument("--delta", type=float, default=DEFAULT_DELTA, help="lldrop threshold in nats (default %(default)s)")
    parser.add_argument("--holdout", type=float, default=0.3, help="fraction of problems held out (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="problem split and bootstrap seed (default %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs; 0 skips them (default %(default)s)")
    parser.add_argument("--json", help="also write the reports to this file")
    args = parser.parse_args(argv)
    try:
        if not 0 < args.holdout < 1:
            raise UserInputError(f"--holdout must be in (0, 1), got {args.holdout}")
        arrays = load_positions(args.records)
        if len(arrays["problem_ids"]) < 2:
            raise UserInputError("the records hold fewer than 2 problems; a held-out split needs more")
        names = [name.strip() for name in args.labels.split(",") if name.strip()]
        reports = [gate_report(arrays, name, delta=args.delta, holdout=args.holdout, seed=args.seed, resamples=args.bootstrap)
                   for name in names]
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(markdown(report) for report in reports))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"records": args.records, "reports": reports}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
