"""The training loop: settings, seeded steps, checkpoints and resuming (`train_head`).

Runs checkpoint into `out_dir` and resume from the latest checkpoint. All randomness is drawn
from generators derived from (seed, what, index), so two half runs equal one full run.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import UserInputError
from ..generation import fitting_prompts
from ..head import EnsembleHead, HeadConfig, PairSignature
from ..models import ModelPair
from ..run_files import check_settings
from ..sampling import SamplingParams, derived_seed
from ..tasks.base import Prompt
from .objective import RewardBaseline, RewardFn, policy_loss
from .rollouts import completion_text, rollout_batch

RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_DIR = "checkpoints"
HEAD_NAME = "head"  # the trained head: out_dir/head.{json,safetensors}
CHECKPOINT_FORMAT = "diversed-train-checkpoint/1"
KEEP_CHECKPOINTS = 2
BASELINES = ("running", "batch", "group")
PromptFn = Callable[[Any], Prompt]


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained head. A resumed run must match them exactly."""

    task: str = "custom"  # a label recorded in the head's config
    prompts: int = 200  # the first `prompts` examples are used
    epochs: int = 2
    batch_size: int = 4  # prompts per step
    samples_per_prompt: int = 1  # completions sampled per prompt (one shared prefill); see baseline "group"
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    lam: float = 0.1  # weight of the acceptance term S (per token, reward in [0, 1]; see docs)
    # Not docs/method.md §5's 'about 5e-4': the head reads raw hidden states (sum of |h| about 7,300 per
    # position for the default pair), so Adam's first ~lr-sized steps move w's logit by up to
    # 2 * lr * 7300: 7 at 5e-4 (w saturates in one step), 0.15 at 1e-5 (docs/training.md).
    lr: float = 1e-5
    warmup_steps: int = 10  # linear warm-up from lr/warmup_steps to lr, then constant
    weight_decay: float = 0.0  # AdamW decay would pull w towards 0.5, not towards 0
    grad_clip: float = 1.0  # max global gradient norm of the head
    baseline: str = "running"  # "running": moving average of past rewards; "batch": this batch's mean; "group": see RewardBaseline
    baseline_decay: float = 0.9  # running baseline: b <- decay * b + (1 - decay) * mean(R)
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {
            "prompts": self.prompts, "epochs": self.epochs, "batch-size": self.batch_size,
            "samples-per-prompt": self.samples_per_prompt, "max-new-tokens": self.max_new_tokens,
        }
        for flag, value in positive.items():
            if not (isinstance(value, int) and value >= 1):
                raise UserInputError(f"--{flag} must be an integer >= 1, got {value!r}")
        if not self.temperature > 0:
            raise UserInputError(f"training samples from the ensemble: --temperature must be > 0, got {self.temperature}")
        self.sampling  # validates top-k / top-p
        if not self.lam >= 0:
            raise UserInputError(f"--lam must be >= 0, got {self.lam}")
        if not self.lr > 0:
            raise UserInputError(f"--lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise UserInputError("warmup_steps and weight_decay must be >= 0 and grad_clip > 0")
        if self.baseline not in BASELINES:
            raise UserInputError(f"--baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}")
        if self.baseline == "group" and self.samples_per_prompt < 2:
            raise UserInputError("--baseline group compares the samples of one prompt: it needs --samples-per-prompt >= 2")
        if not 0 <= self.baseline_decay < 1:
            raise UserInputError(f"the baseline decay must be in [0, 1), got {self.baseline_decay}")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    def steps_per_epoch(self, n_examples: int) -> int:
        return math.ceil(n_examples / self.batch_size)


def seeded_generator(seed: int, what: str, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one use of randomness (an epoch's shuffle, a step's rollouts), independent of history."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, what, index, bits=63))


# ----------------------------------------------------------------------------- state and checkpoints


@dataclass
class TrainState:
    """What a checkpoint holds; with (settings, step) it determines the rest of the run."""

    head: EnsembleHead
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    baseline: RewardBaseline
    step: int = 0  # optimizer steps done


def new_state(settings: TrainSettings, signature: PairSignature, device: torch.device) -> TrainState:
    """A fresh head (w = 0.5 everywhere), AdamW over the head only, linear warm-up."""
    head = EnsembleHead(HeadConfig(signature)).to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(1, settings.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return TrainState(head, optimizer, scheduler, RewardBaseline(settings.baseline, settings.baseline_decay))


def checkpoint_paths(out_dir: Path) -> list[Path]:
    """Checkpoints in `out_dir`, oldest first."""
    return sorted((out_dir / CHECKPOINT_DIR).glob("step-*.pt"))


def save_checkpoint(out_dir: Path, state: TrainState, settings: TrainSettings) -> Path:
    """Write the state atomically and keep only the newest KEEP_CHECKPOINTS files."""
    folder = out_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{state.step:07d}.pt"
    payload = {
        "format": CHECKPOINT_FORMAT,
        "step": state.step,
        "settings": asdict(settings),
        "head": state.head.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "baseline": state.baseline.value,
        # The RNG state is derived, not stored: step s samples with seeded_generator(seed, "step", s)
        # and epoch e shuffles with seeded_generator(seed, "epoch", e).
        "rng": {"seed": settings.seed, "next_step": state.step},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    for old in checkpoint_paths(out_dir)[:-KEEP_CHECKPOINTS]:
        old.unlink()
    return path


def load_checkpoint(path: Path, state: TrainState) -> None:
    """Restore `state` in place from a checkpoint written by `save_checkpoint`."""
    payload = torch.load(path, map_location=state.head.linear.weight.device, weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise UserInputError(f"{path} is not a diversed training checkpoint")
    state.head.load_state_dict(payload["head"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.baseline.value = payload["baseline"]
    state.step = int(payload["step"])


def check_run(out_dir: Path, record: dict[str, Any]) -> None:
    """Record a new run's settings, pair and data; refuse to resume a run that differs.

    A setting added after a run was recorded counts as that run's default value, so runs
    started by an older version still resume with the defaults.
    """
    check_settings(out_dir / RUN_FILE, record, {"settings": asdict(TrainSettings())}, what="training run")


def trim_log(path: Path, step: int) -> None:
    """Drop log rows after `step` (written after the last checkpoint; they will be redone)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by the interruption
        if row.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def git_commit() -> str | None:
    """The commit of the source tree this module lives in, if it is a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


# ----------------------------------------------------------------------------- training loop


def example_digest(examples: Sequence[Any]) -> str:
    """Identifies the training data (ids when examples have them, else their text) for resume checks."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(str(getattr(example, "id", example)).encode() + b"\n")
    return digest.hexdigest()[:16]


def batch_for_step(settings: TrainSettings, n_examples: int, step: int) -> list[int]:
    """Indices of the examples of global step `step`: each epoch is a fresh seeded shuffle."""
    per_epoch = settings.steps_per_epoch(n_examples)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=seeded_generator(settings.seed, "epoch", epoch))
    return order[index * settings.batch_size : (index + 1) * settings.batch_size].tolist()


def train_step(
    pair: ModelPair,
    state: TrainState,
    batch: Sequence[tuple[Any, list[int]]],
    reward_fn: RewardFn,
    settings: TrainSettings,
) -> dict[str, Any]:
    """Roll out, score, update the head once. -> the step's log row."""
    started = time.perf_counter()
    # Sampling happens where the models' probabilities live.
    generator = seeded_generator(settings.seed, "step", state.step, state.head.linear.weight.device)
    state.head.eval()
    rollouts = rollout_batch(
        pair, state.head, [ids for _, ids in batch], settings.max_new_tokens, settings.sampling, generator, settings.samples_per_prompt
    )  # [B * K], a prompt's K samples adjacent
    rollout_s = time.perf_counter() - started
    examples = [example for example, _ in batch for _ in range(settings.samples_per_prompt)]  # [B * K]
    rewards = torch.tensor([float(reward_fn(example, completion_text(pair, r))) for example, r in zip(examples, rollouts)])  # [B * K]
    reward_s = time.perf_counter() - started - rollout_s

    update_started = time.perf_counter()
    baseline = state.baseline.current(rewards, settings.samples_per_prompt)  # [B * K]
    state.head.train()
    terms = policy_loss(state.head, rollouts, rewards - baseline, settings.lam, settings.max_new_tokens)
    state.optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.head.parameters(), settings.grad_clip)
    lr = state.optimizer.param_groups[0]["lr"]
    state.optimizer.step()
    state.scheduler.step()
    state.baseline.update(rewards)
    state.step += 1
    update_s = time.perf_counter() - update_started

    weights = torch.cat([r.weights for r in rollouts])  # [T_total] as sampled (before this update)
    tv = torch.cat([r.tv for r in rollouts])  # [T_total]
    tokens = int(weights.numel())
    return {
        "step": state.step,
        "reward": float(rewards.mean()),
        "baseline": float(baseline.mean()),
        "loss": terms.loss.item(),
        "pg_loss": terms.pg.item(),
        "acceptance_sum": terms.acceptance.item(),  # S: expected accepted drafts per sequence
        "mean_w": float(weights.mean()),
        "acceptance_proxy": float((1 - weights * tv).mean()),  # mean_t 1 - w_t TV_t
        "mean_tv": float(tv.mean()),
        "estimated_bias": float(((1 - weights) * tv).sum() / len(rollouts)),  # per sequence (docs/method.md §6)
        "tokens": tokens,
        "ended_with_eos": sum(r.ended for r in rollouts),
        "grad_norm": float(grad_norm),
        "lr": lr,
        "rollout_s": rollout_s,
        "reward_s": reward_s,
        "update_s": update_s,
        "step_s": time.perf_counter() - started,
        "rollout_tokens_per_s": tokens / rollout_s if rollout_s > 0 else None,
    }


def freeze(pair: ModelPair) -> None:
    """Both LMs are constants of the objective: no gradients, no optimizer state."""
    if pair.draft is None:
        raise UserInputError("training an ensemble head needs a draft model")
    for model in (pair.target, pair.draft):
        model.eval().requires_grad_(False)


def train_head(
    pair: ModelPair,
    examples: Sequence[Any],
    prompt_fn: PromptFn,
    reward_fn: RewardFn,
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    progress: bool = True,
    checkpoint_every: int = 1,
    stop_after: int | None = None,
    time_limit_s: float | None = None,
) -> EnsembleHead:
    """Train (or resume training) an ensemble head; save it as `out_dir/head.{json,safetensors}`.

    `examples[:settings.prompts]` are the training prompts: `prompt_fn(example)` is the user
    message (wrapped in the target's chat template), `reward_fn(example, completion_text)`
    the reward (keep it in [0, 1] so `lam` means the same on every task). A checkpoint is
    written every `checkpoint_every` steps and when the run stops; rerunning with the same
    arguments resumes from the latest one. `stop_after` (global steps) and `time_limit_s`
    end a run early (resumable), e.g. to fit a time-boxed job. Returns the head (in eval mode).
    """
    out_dir = Path(out_dir)
    freeze(pair)
    signature = pair.signature()
    if len(examples) < settings.prompts:
        raise UserInputError(f"--prompts {settings.prompts} asks for more examples than there are ({len(examples)})")
    prompts, skipped = fitting_prompts(pair, examples[: settings.prompts], prompt_fn, settings.max_new_tokens)
    if not prompts:
        raise UserInputError("no training prompt fits the context window with --max-new-tokens room")
    if skipped:
        print(f"note: skipping {len(skipped)} prompts too long for the context window", file=sys.stderr)
    check_run(out_dir, {"settings": asdict(settings), "pair": asdict(signature), "examples": example_digest([e for e, _ in prompts])})

    device = pair.device
    state = new_state(settings, signature, device)
    checkpoints = checkpoint_paths(out_dir)
    if checkpoints:
        load_checkpoint(checkpoints[-1], state)
    log_path = out_dir / LOG_FILE
    trim_log(log_path, state.step)

    total = settings.epochs * settings.steps_per_epoch(len(prompts))
    end = total if stop_after is None else min(total, stop_after)
    started = time.perf_counter()
    bar = _progress_bar(total, state.step, progress)
    try:
        with open(log_path, "a") as log:
            while state.step < end:
                batch = [prompts[i] for i in batch_for_step(settings, len(prompts), state.step)]
                row = train_step(pair, state, batch, reward_fn, settings)
                row["epoch"] = (row["step"] - 1) // settings.steps_per_epoch(len(prompts))
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(
                    reward=f"{row['reward']:.3f}", w=f"{row['mean_w']:.3f}", accept=f"{row['acceptance_proxy']:.3f}",
                    s_step=f"{row['step_s']:.1f}", rollout=f"{row['rollout_s'] / row['step_s']:.0%}",
                )
                timed_out = time_limit_s is not None and time.perf_counter() - started >= time_limit_s
                if state.step % checkpoint_every == 0 or state.step == end or timed_out:
                    save_checkpoint(out_dir, state, settings)
                if timed_out:
                    break
    finally:
        bar.close()
    state.head.eval()
    if state.step >= total:
        save_trained_head(state.head, out_dir, settings, state.step)
    return state.head


def save_trained_head(head: EnsembleHead, out_dir: Path, settings: TrainSettings, steps: int) -> Path:
    """out_dir/head.{json,safetensors}, the config naming the pair, task, settings and commit."""
    extra = {"task": settings.task, "training": {**asdict(settings), "steps": steps}, "git_commit": git_commit()}
    head.config = HeadConfig(head.config.pair, extra)
    return head.save(out_dir / HEAD_NAME)


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training head", unit="step", file=sys.stderr, disable=not enabled)


def load_training_examples(task_name: str, n: int, data_dir: str | None) -> tuple[Any, list[Any]]:
    """(task, its first n training examples); a task without a train split is an error (no training on test data)."""
    from ..tasks import get_task

    task = get_task(task_name)
    if "train" not in task.splits:
        raise UserInputError(f"task {task_name} has no train split (it has {', '.join(task.splits)}); heads are never trained on test data")
    examples = task.load("train", n, data_dir)
    if len(examples) < n:
        raise UserInputError(f"--prompts {n} asks for more examples than {task_name}'s train split has ({len(examples)})")
    return task, examples


