"""Per-position records and mismatch labels on target completions (issue 15): `diversed mine`.

For each of the first K problems of a task's train split:

1. draw a completion y from the TARGET (method `ar`, the mining temperature, a per-problem seed);
2. teacher-force both models over it once and record, at every position t, scalar statistics
   of p_t and q_t (FEATURES), the class of y_t, and a fixed random projection of both hidden
   states;
3. at the *mismatches* (argmax q_t != y_t), label how much substituting the draft's token d_t
   matters, two ways, timing each:
   - likelihood change (SelfJudge): log p(y_{>t} | y_{<t}, d_t) - log p(y_{>t} | y_{<t}, y_t)
     under the plain target softmax, over the whole suffix and over its first LL_WINDOW tokens;
   - counterfactual (AutoJudge): continue y_{<t} d_t greedily with the target to the same total
     length and record whether the task outcome flips (at most --max-counterfactuals per problem,
     a seeded random subset of the mismatches).

Files under --out: `settings.json` (a resumed run must match), `records.jsonl` (one line per
problem, columnar per-position arrays, appended and fsynced per problem so a crash loses at most
the problem in progress) and `cost.json` (seconds per stage, summed over resumed runs).
`load_positions(dir)` flattens the records into numpy arrays, one row per position.

Only the public model API is used (`generate`, `encode_prompt`, `evaluate.teacher_forced`), so
mining runs unchanged on any backend behind it.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .engine import GenerationConfig
from .features import FEATURES, PROJECTION_DIMS, position_features, projection  # noqa: F401 (FEATURES, PROJECTION_DIMS: the record schema)
from .errors import UserInputError
from .evaluate import encodable_examples, example_seed, teacher_forced
from .generation import MethodSpec, first_stop, generate
from .methods import AR
from .models import ModelPair
from .runners.base import ModelRunner
from .run_files import RunSettings, atomic_write_text, read_rows
from .run_files import check_settings as check_recorded_settings
from .sampling import SamplingParams, logits_to_probs
from .tasks import Example, Task

RECORDS_FILE = "records.jsonl"
SETTINGS_FILE = "settings.json"
COST_FILE = "cost.json"

TOKEN_CLASSES = ("digit", "operator", "identifier", "whitespace", "other")
OPERATOR_CHARS = set("+-*/=<>%^&|!~()[]{}.,:;")

LL_WINDOW = 16  # the short-horizon likelihood label: the first tokens after the substitution
# XSum has no pass/fail outcome: a counterfactual "flips" when ROUGE-2 drops by this many points.
ROUGE_FLIP_DROP = 5.0
BINARY_METRICS = ("accuracy", "pass@1")

COST_KEYS = (
    "problems", "tokens", "mismatches", "likelihood_labels", "counterfactual_labels",
    "seconds_generation", "seconds_teacher_forcing", "seconds_likelihood", "seconds_counterfactual",
)


@dataclass(frozen=True)
class MineSettings(RunSettings):
    """Everything that decides what a record contains. A resumed run must match them exactly."""

    max_new_tokens: int
    max_counterfactuals: int
    seed: int
    max_likelihood_labels: int | None = None  # None: every mismatch
    # Also continue greedily from the ORIGINAL token at each counterfactual position. With a
    # sampled completion (temperature > 0) a greedy continuation may change the outcome by
    # itself; `flip_vs_control` then isolates the substitution's effect.
    control: bool = False
    raw: bool = False
    save_hidden: bool = False
    prompt_version: int = 1
    backend: str = "torch"  # the kernels (and, for the embedded pair, the weights' precision) differ

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature)


# ----------------------------------------------------------------------------- features


def token_class(text: str) -> int:
    """Index into TOKEN_CLASSES of one decoded token."""
    stripped = text.strip()
    if not stripped:
        return TOKEN_CLASSES.index("whitespace")
    if any(ch.isdigit() for ch in stripped) and all(ch.isdigit() or ch in ".," for ch in stripped):
        return TOKEN_CLASSES.index("digit")
    if all(ch in OPERATOR_CHARS for ch in stripped):
        return TOKEN_CLASSES.index("operator")
    if stripped.replace("_", "").isalnum():
        return TOKEN_CLASSES.index("identifier")
    return TOKEN_CLASSES.index("other")


def _rounded(values: torch.Tensor, digits: int = 6) -> list:
    return np.round(values.double().numpy(), digits).tolist()


# ----------------------------------------------------------------------------- labels


def _suffix_loglik(p: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """log p(token_j) at each row. p: [T, V] -> [T] (T = len(tokens))."""
    index = torch.tensor(list(tokens), dtype=torch.long)[:, None]  # [T, 1]
    return p.gather(-1, index)[:, 0].clamp_min(torch.finfo(p.dtype).tiny).log()


def likelihood_label(target: ModelRunner, vocab_size: int, prompt_ids: list[int], completion: list[int], t: int,
                     draft_token: int, original_loglik: torch.Tensor) -> tuple[float, float]:
    """(full-suffix, first-LL_WINDOW) change in the target's log-likelihood of y_{>t} when y_t -> d_t.

    target: a runner holding the prompt but its last token (kept between labels, so a label
    costs one pass over the completion, not over the prompt again).
    original_loglik: [T] log p(y_j | y_{<j}) of the unchanged completion under the plain softmax.
    """
    suffix = completion[t + 1 :]
    if not suffix:
        return 0.0, 0.0
    substituted = completion[:t] + [draft_token] + suffix
    target.rollback(len(prompt_ids) - 1)
    logits, _ = target.feed([prompt_ids[-1]] + substituted[:-1], len(suffix))  # [T - t - 1, V]: predictions of the suffix
    p = logits_to_probs(logits[:, :vocab_size], SamplingParams()).cpu()
    changed = _suffix_loglik(p, suffix) - original_loglik[t + 1 :]  # [T - t - 1]
    return float(changed.sum()), float(changed[:LL_WINDOW].sum())


def counterfactual_text(pair: ModelPair, task: Task, settings: MineSettings, prompt_ids: list[int],
                        completion: list[int], t: int, draft_token: int) -> str:
    """The completion with d_t at t, continued greedily by the target to the original total budget."""
    prefix = completion[:t] + [draft_token]
    stops = task.stop(settings.raw)
    rest_budget = settings.max_new_tokens - len(prefix)
    new_ids: list[int] = []
    config = GenerationConfig(max(rest_budget, 1), sampling=SamplingParams(0.0), seed=0, stop=())
    room = pair.context_window - len(prompt_ids) - len(prefix) - config.draft_length - 1  # as `generate` reserves
    if draft_token not in pair.eos_token_ids and rest_budget > 0 and room > 0:
        new_ids = generate(pair, prompt_ids + prefix, MethodSpec(AR), config).token_ids
    text = pair.tokenizer.decode(prefix + new_ids, skip_special_tokens=True)
    cut = first_stop(text, stops)
    return text if cut is None else text[:cut]


def outcome_flipped(task: Task, original_score: float, counterfactual_score: float) -> bool:
    """Binary tasks: pass/fail changed (either way). ROUGE/BLEU tasks: dropped by ROUGE_FLIP_DROP."""
    if task.metric_name in BINARY_METRICS:
        return (original_score >= 0.5) != (counterfactual_score >= 0.5)
    return original_score - counterfactual_score >= ROUGE_FLIP_DROP


# ----------------------------------------------------------------------------- one problem


def mine_problem(pair: ModelPair, task: Task, example: Example, prompt_ids: list[int], settings: MineSettings,
                 out_dir: Path, cost: dict[str, float]) -> dict[str, Any]:
    """One problem's record; adds its seconds and counts to `cost`."""
    params = settings.sampling
    seed = example_seed(settings.seed, example.id)
    started = time.perf_counter()
    config = GenerationConfig(settings.max_new_tokens, sampling=params, seed=seed, stop=task.stop(settings.raw))
    result = generate(pair, prompt_ids, MethodSpec(AR), config)
    cost["seconds_generation"] += time.perf_counter() - started
    completion = list(result.token_ids)
    original_score = float(task.score(example, result.text))
    record: dict[str, Any] = {
        "id": example.id, "seed": seed, "prompt_tokens": len(prompt_ids), "completion_ids": completion,
        "completion": result.text, "finish_reason": result.finish_reason, "score": original_score,
    }
    if not completion:
        return {**record, "positions": 0}

    started = time.perf_counter()
    (target_hidden, draft_hidden), (p, q) = teacher_forced(pair, prompt_ids, completion, params)  # [T, H], [T, V]
    cost["seconds_teacher_forcing"] += time.perf_counter() - started
    completion = completion[: p.shape[0]]  # teacher forcing stops at the context window
    tokens = torch.tensor(completion, dtype=torch.long)  # [T]
    draft_tokens = q.argmax(-1)  # [T]
    features = position_features(p, q, tokens)
    mismatches = [int(t) for t in torch.nonzero(draft_tokens != tokens)[:, 0]]
    record.update(
        positions=len(completion),
        features={name: _rounded(values) for name, values in features.items()},
        token_class=[token_class(pair.tokenizer.decode([tok])) for tok in completion],
        target_projection=_rounded(target_hidden @ projection(target_hidden.shape[1]), 4),  # [T, 32]
        draft_projection=_rounded(draft_hidden @ projection(draft_hidden.shape[1]), 4),  # [T, 32]
    )
    if settings.save_hidden:
        _save_hidden(out_dir, example.id, target_hidden, draft_hidden)
    counterfactual_at, likelihood_at = _label_positions(settings, example, mismatches)
    record["mismatches"] = {"position": mismatches, "draft_token": [int(draft_tokens[t]) for t in mismatches]}
    record["likelihood"] = _likelihood_labels(pair, prompt_ids, completion, p, likelihood_at, draft_tokens, params, cost)
    record["counterfactuals"] = _counterfactual_labels(pair, task, example, settings, prompt_ids, completion, counterfactual_at,
                                                       draft_tokens, original_score, cost)
    cost["tokens"] += len(completion)
    cost["mismatches"] += len(mismatches)
    return record


def _label_positions(settings: MineSettings, example: Example, mismatches: list[int]) -> tuple[list[int], list[int]]:
    """(counterfactual, likelihood) label positions: seeded random subsets of the mismatches.

    The likelihood subset always contains the counterfactual one, so both labels can be
    compared at the same positions.
    """
    rng = random.Random(example_seed(settings.seed, f"labels:{example.id}"))
    shuffled = rng.sample(mismatches, len(mismatches))
    counterfactual = shuffled[: settings.max_counterfactuals]
    cap = len(mismatches) if settings.max_likelihood_labels is None else max(settings.max_likelihood_labels, len(counterfactual))
    return sorted(counterfactual), sorted(shuffled[:cap])


def _plain(params: SamplingParams) -> bool:
    """Whether `params` gives the plain softmax (temperature 0 and 1 both do, without filtering)."""
    return params.temperature in (0.0, 1.0) and params.top_k == 0 and params.top_p == 1.0


def _likelihood_labels(pair, prompt_ids, completion, p, positions, draft_tokens, params, cost) -> dict[str, list]:
    started = time.perf_counter()
    if _plain(params):
        plain_p = p
    else:  # the likelihood label is under the target's own softmax, not the decoding temperature
        _, (plain_p, _) = teacher_forced(pair, prompt_ids, completion, SamplingParams())
    original_loglik = _suffix_loglik(plain_p, completion)  # [T]
    labels: dict[str, list] = {"position": [], "ll_delta": [], "ll_delta_window": [], "seconds": []}
    target = pair.runner("target")
    if positions:
        target.feed(prompt_ids[:-1], 0)
    for t in positions:
        one = time.perf_counter()
        full, window = likelihood_label(target, pair.vocab_size, prompt_ids, completion, t, int(draft_tokens[t]), original_loglik)
        labels["position"].append(t)
        labels["ll_delta"].append(round(full, 5))
        labels["ll_delta_window"].append(round(window, 5))
        labels["seconds"].append(round(time.perf_counter() - one, 4))
    cost["seconds_likelihood"] += time.perf_counter() - started
    cost["likelihood_labels"] += len(positions)
    return labels


def _counterfactual_labels(pair, task, example, settings, prompt_ids, completion, chosen, draft_tokens,
                           original_score, cost) -> dict[str, list]:
    labels: dict[str, list] = {"position": [], "score": [], "flip": [], "completion": [], "seconds": []}
    if settings.control:
        labels.update(control_score=[], flip_vs_control=[])
    for t in chosen:
        started = time.perf_counter()
        text = counterfactual_text(pair, task, settings, prompt_ids, completion, t, int(draft_tokens[t]))
        score = float(task.score(example, text))
        labels["position"].append(t)
        labels["score"].append(score)
        labels["flip"].append(outcome_flipped(task, original_score, score))
        labels["completion"].append(text)
        if settings.control:
            control = float(task.score(example, counterfactual_text(pair, task, settings, prompt_ids, completion, t, completion[t])))
            labels["control_score"].append(control)
            labels["flip_vs_control"].append(outcome_flipped(task, control, score))
        seconds = time.perf_counter() - started
        labels["seconds"].append(round(seconds, 4))
        cost["seconds_counterfactual"] += seconds
    cost["counterfactual_labels"] += len(chosen)
    return labels


def _save_hidden(out_dir: Path, example_id: str, target_hidden: torch.Tensor, draft_hidden: torch.Tensor) -> None:
    from safetensors.torch import save_file

    folder = out_dir / "hidden"
    folder.mkdir(exist_ok=True)
    safe_id = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in example_id)
    save_file({"target": target_hidden.half().contiguous(), "draft": draft_hidden.half().contiguous()}, folder / f"{safe_id}.safetensors")


# ----------------------------------------------------------------------------- run files


def check_settings(out_dir: Path, settings: MineSettings) -> None:
    """Record the settings of a new run; refuse to mix records of runs that differ."""
    defaults = {f.name: f.default for f in fields(MineSettings)}
    check_recorded_settings(out_dir / SETTINGS_FILE, asdict(settings), defaults, what="mining run")


def load_cost(out_dir: Path) -> dict[str, float]:
    path = out_dir / COST_FILE
    stored = json.loads(path.read_text()) if path.is_file() else {}
    return {key: float(stored.get(key, 0.0)) for key in COST_KEYS}


def cost_summary(cost: dict[str, float]) -> dict[str, float | None]:
    """The totals plus per-problem and per-label means (None where nothing was counted)."""
    def per(key: str, count: str) -> float | None:
        return cost[key] / cost[count] if cost[count] else None

    return {
        **cost,
        "generation_seconds_per_problem": per("seconds_generation", "problems"),
        "teacher_forcing_seconds_per_problem": per("seconds_teacher_forcing", "problems"),
        "mismatches_per_problem": per("mismatches", "problems"),
        "tokens_per_problem": per("tokens", "problems"),
        "seconds_per_likelihood_label": per("seconds_likelihood", "likelihood_labels"),
        "seconds_per_counterfactual_label": per("seconds_counterfactual", "counterfactual_labels"),
    }


def _write_cost(out_dir: Path, cost: dict[str, float]) -> None:
    atomic_write_text(out_dir / COST_FILE, json.dumps(cost_summary(cost), indent=2) + "\n")


def run_mining(pair: ModelPair, task: Task, examples: Sequence[Example], settings: MineSettings, out_dir: str | Path,
               *, progress: bool | None = None) -> dict[str, float | None]:
    """Mine every example not yet in `out_dir` (resuming), one fsynced line per problem. -> cost summary."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    check_settings(out_dir, settings)
    records_path = out_dir / RECORDS_FILE
    done = {row["id"] for row in _load_records(records_path)}  # also drops a line cut off by a crash
    prompts, skipped = encodable_examples(pair, task, examples, settings.raw, room=2)
    if skipped:
        print(f"note: skipping {len(skipped)} problem(s) whose prompt does not fit the context window", file=sys.stderr)
    todo = [(example, ids) for example, ids in prompts if example.id not in done]
    cost = load_cost(out_dir)
    with open(records_path, "a", encoding="utf-8") as out, tqdm(
        total=len(todo), desc=f"mine {task.name}", unit="problem", file=sys.stderr, disable=None if progress is None else not progress
    ) as bar:
        for example, prompt_ids in todo:
            fresh = dict.fromkeys(COST_KEYS, 0.0)
            record = mine_problem(pair, task, example, prompt_ids, settings, out_dir, fresh)
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
            fresh["problems"] = 1
            cost = {key: cost[key] + fresh[key] for key in COST_KEYS}
            _write_cost(out_dir, cost)
            bar.set_postfix(mismatches=int(fresh["mismatches"]), refresh=False)
            bar.update()
    return cost_summary(cost)


def _load_records(path: Path) -> list[dict[str, Any]]:
    """The mined records so far: one per problem, keyed by its id (not eval rows)."""
    return read_rows(path, ("id",), "a mining record")


def load_positions(out_dir: str | Path) -> dict[str, Any]:
    """Every mined position as numpy arrays, one row per position (P rows in all).

    -> problem [P] (index into problem_ids), position [P], features [P, len(FEATURES)],
    token_class [P], target_projection / draft_projection [P, PROJECTION_DIMS], mismatch [P] bool,
    ll_delta / ll_delta_window / cf_flip / cf_flip_vs_control [P] float (NaN where the position has no such
    label; cf_flip_vs_control only from runs with --control),
    problem_ids [problems], feature_names.
    """
    path = Path(out_dir) / RECORDS_FILE
    if not path.is_file():
        raise UserInputError(f"no {RECORDS_FILE} in {out_dir}; run `diversed mine --out {out_dir}` first")
    columns: dict[str, list] = {key: [] for key in ("problem", "position", "features", "token_class", "target_projection",
                                                      "draft_projection", "mismatch", "ll_delta", "ll_delta_window", "cf_flip",
                                                      "cf_flip_vs_control")}
    problem_ids = []
    for row in _load_records(path):
        count = row.get("positions", 0)
        if not count:
            continue
        index = len(problem_ids)
        problem_ids.append(row["id"])
        columns["problem"].append(np.full(count, index))
        columns["position"].append(np.arange(count))
        columns["features"].append(np.stack([np.asarray(row["features"][name], dtype=np.float64) for name in FEATURES], axis=1))
        columns["token_class"].append(np.asarray(row["token_class"]))
        for key in ("target_projection", "draft_projection"):
            columns[key].append(np.asarray(row[key], dtype=np.float64).reshape(count, -1))
        labels = {key: np.full(count, np.nan) for key in ("ll_delta", "ll_delta_window", "cf_flip", "cf_flip_vs_control")}
        mismatch = np.zeros(count, dtype=bool)
        mismatch[np.asarray(row["mismatches"]["position"], dtype=int)] = True
        at = np.asarray(row["likelihood"]["position"], dtype=int)
        labels["ll_delta"][at] = row["likelihood"]["ll_delta"]
        labels["ll_delta_window"][at] = row["likelihood"]["ll_delta_window"]
        at = np.asarray(row["counterfactuals"]["position"], dtype=int)
        labels["cf_flip"][at] = row["counterfactuals"]["flip"]
        if "flip_vs_control" in row["counterfactuals"]:
            labels["cf_flip_vs_control"][at] = row["counterfactuals"]["flip_vs_control"]
        columns["mismatch"].append(mismatch)
        for key, values in labels.items():
            columns[key].append(values)
    if not problem_ids:
        raise UserInputError(f"{path} holds no mined positions yet")
    arrays: dict[str, Any] = {key: np.concatenate(values) for key, values in columns.items()}
    arrays["problem_ids"] = problem_ids
    arrays["feature_names"] = list(FEATURES)
    return arrays


# An lldrop label: substituting the draft token makes the original rest e^2 ≈ 7 times less likely.
DEFAULT_DELTA = 2.0


def importance_labels(arrays: dict[str, Any], name: str, delta: float) -> np.ndarray:
    """[P] float: 1 important, 0 not, NaN where the position has no such label (docs/mining.md).

    flip / flip_vs_control: the counterfactual changed the outcome; lldrop: ll_delta < -delta nats.
    """
    if name == "flip":
        return arrays["cf_flip"].astype(float)
    if name == "flip_vs_control":
        return arrays["cf_flip_vs_control"].astype(float)
    if name == "lldrop":
        drop = -arrays["ll_delta"]
        return np.where(np.isnan(drop), np.nan, (drop > delta).astype(float))
    raise UserInputError(f"unknown label {name!r}; choose flip, flip_vs_control or lldrop")
