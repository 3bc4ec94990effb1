"""Training the DIVERSED ensemble head with sequence-level RL (docs/method.md §5).

Both language models are frozen; only the `EnsembleHead` learns. One step:

1. **Rollouts.** For each prompt of the batch, sample y (`samples_per_prompt` times, from
   one shared prefill) from the ensemble `v_t = w_t p_t + (1 - w_t) q_t` at the training
   temperature, with `w_t` from the current head. Both models decode the whole batch in
   lockstep (left-padded, KV-cached, one token per row per step; rows leave the batch at EOS). Per token only what the loss needs is
   kept: p_t(y_t), q_t(y_t), TV(p_t, q_t) and both hidden states. p and q do not depend on
   the head, so the loss recomputed from these (through the head alone) is exact.
2. **Reward.** `reward_fn(example, completion_text)`; advantage A_b = R_b - baseline_b
   (a running mean, the batch mean, or the mean of the prompt's other samples).
3. **Loss.** `loss = (L_pg - lam * S) / M`, M = max_new_tokens (a constant), where
   `L_pg = -mean_b[A_b * sum_t log v_t(y_t)]` and `S = mean_b sum_t (1 - w_t TV(q_t, p_t))`.
   S (expected accepted drafts per sequence) is *maximised*.
4. AdamW on the head (linear warm-up, gradient clipping).

Runs checkpoint into `out_dir` and resume from the latest checkpoint. All randomness is drawn
from generators derived from (seed, what, index), so two half runs equal one full run.

    head = train_head(pair, examples, task.prompt, task_reward(task), TrainSettings(task="gsm8k"), "runs/gsm8k")

Command line: `diversed train` (docs/training.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import UserInputError
from .head import EnsembleHead, HeadConfig, PairSignature
from .models import ModelPair
from .sampling import SamplingParams, logits_to_probs, sample, total_variation
from .verifiers import DynamicEnsemble
from .tasks.base import Prompt

RUN_FILE = "run.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_DIR = "checkpoints"
HEAD_NAME = "head"  # the trained head: out_dir/head.{json,safetensors}
CHECKPOINT_FORMAT = "diversed-train-checkpoint/1"
KEEP_CHECKPOINTS = 2
BASELINES = ("running", "batch", "group")
# Task scores in percent (ROUGE, BLEU) are divided by 100 so every reward lies in [0, 1] and
# one lam means the same trade-off on every task.
PERCENT_METRICS = {"rouge2", "bleu"}

RewardFn = Callable[[Any, str], float]
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


def derive_seed(seed: int, what: str, index: int) -> int:
    """A seed for one use of randomness (an epoch's shuffle, a step's rollouts), independent of history."""
    digest = hashlib.sha256(f"{seed}:{what}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_generator(seed: int, what: str, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, what, index))


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    """One sampled completion and what the loss needs of each of its T tokens."""

    tokens: list[int]  # [T] sampled ids; an EOS that ended the sequence is the last one
    p_token: torch.Tensor  # [T] p_t(y_t), target probability of the sampled token
    q_token: torch.Tensor  # [T] q_t(y_t), draft probability of the sampled token
    tv: torch.Tensor  # [T] TV(p_t, q_t)
    draft_hidden: torch.Tensor  # [T, H_d] the draft's last-layer state that produced q_t
    target_hidden: torch.Tensor  # [T, H_t] the target's last-layer state that produced p_t
    weights: torch.Tensor  # [T] w_t the rollout sampled with (no gradient)
    ended: bool  # True when EOS ended it (else max_new_tokens did)

    @property
    def length(self) -> int:
        return len(self.tokens)


def rollout(
    pair: ModelPair,
    head: EnsembleHead,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator,
) -> Rollout:
    """Sample one completion from the ensemble with the current head (both models KV-cached, in lockstep)."""
    return rollout_batch(pair, head, [prompt_ids], max_new_tokens, params, generator)[0]


class _BatchLM:
    """A causal LM decoding a left-padded batch with one KV cache; rows can leave the batch."""

    def __init__(self, model: Any, vocab_size: int):
        from transformers import DynamicCache

        self.body = model.base_model  # the decoder stack without the LM head
        self.lm_head = model.get_output_embeddings()
        self.cache = DynamicCache(config=model.config)
        self.vocab_size = vocab_size

    def feed(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, positions: [A, L] appended to the cache; mask: [A, cached + L] (0 = padding).

        -> logits [A, V] (float32) and last-layer hidden states [A, H] at each row's last position.
        """
        out = self.body(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True)
        last = out.last_hidden_state[:, -1]  # [A, H]
        return self.lm_head(last)[:, : self.vocab_size].float(), last

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every batch row not in `rows` [A'] from the cache."""
        self.cache.batch_select_indices(rows)

    def repeat(self, repeats: int) -> None:
        """Copy every cached row `repeats` times, copies next to each other: [A] -> [A * repeats]."""
        self.cache.batch_repeat_interleave(repeats)


def rollout_batch(
    pair: ModelPair,
    head: EnsembleHead,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator,
    repeats: int = 1,
) -> list[Rollout]:
    """Sample `repeats` completions per prompt from the ensemble with the current head, all at once.

    Both models decode the batch in lockstep, KV-cached: prompts are left-padded (masked
    out, positions counted from each prompt's first real token), each step feeds one token
    per row, and a row that emits EOS leaves the batch, so finished completions cost nothing.
    On a memory-bound CPU a step over B rows costs little more than a step over one (the
    weights are read once), which is what makes RL rollouts affordable here. With
    `repeats` > 1 each prompt is prefilled once and its KV cache copied to its samples, so a
    group of samples pays for one prefill (few-shot prompts make prefill a large share).
    Returns rollouts in prompt order, a prompt's samples next to each other: [B * repeats].
    """
    # The same verifier the engine uses at inference: training samples exactly the v it verifies against.
    ensemble = DynamicEnsemble(head=head)
    device = head.linear.weight.device
    model_device = pair.device
    eos = torch.tensor(sorted(pair.eos_token_ids), device=device)
    batch = len(prompts) * repeats
    longest = max(len(ids) for ids in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)  # [B, L] left-padded (id 0 under the mask)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)  # [B, L]
    for b, prompt_ids in enumerate(prompts):
        ids[b, longest - len(prompt_ids) :] = torch.tensor(prompt_ids)
        mask[b, longest - len(prompt_ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, L]
    ids, mask, positions = ids.to(model_device), mask.to(model_device), positions.to(model_device)

    rows: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in range(batch)]  # per sample, per token
    ended = [False] * batch
    active = torch.arange(batch)  # [A] sample index of each batch row
    with torch.inference_mode():
        target, draft = _BatchLM(pair.target, pair.vocab_size), _BatchLM(pair.draft, pair.vocab_size)
        target_logits, target_hidden = target.feed(ids, mask, positions)  # prefill: [B, V], [B, H_t]
        draft_logits, draft_hidden = draft.feed(ids, mask, positions)  # [B, V], [B, H_d]
        if repeats > 1:  # one prefill per prompt, copied to its samples
            target.repeat(repeats)
            draft.repeat(repeats)
            target_logits, target_hidden, draft_logits, draft_hidden, mask, positions = (
                t.repeat_interleave(repeats, dim=0) for t in (target_logits, target_hidden, draft_logits, draft_hidden, mask, positions)
            )
        for step in range(max_new_tokens):
            if step > 0:
                target_logits, target_hidden = target.feed(ids, mask, positions)  # [A, V], [A, H_t]
                draft_logits, draft_hidden = draft.feed(ids, mask, positions)  # [A, V], [A, H_d]
            p = logits_to_probs(target_logits, params).to(device)  # [A, V]
            q = logits_to_probs(draft_logits, params).to(device)  # [A, V]
            draft_hidden, target_hidden = draft_hidden.to(device), target_hidden.to(device)
            ctx = ensemble.context(draft_hidden, target_hidden)  # weights [A]
            v = ensemble.verification_target(p, q, ctx)  # [A, V]
            tokens = sample(v, generator)  # [A]
            p_token = p.gather(-1, tokens[:, None])[:, 0]  # [A]
            q_token = q.gather(-1, tokens[:, None])[:, 0]  # [A]
            tv = total_variation(p, q)  # [A]
            for row, b in enumerate(active.tolist()):
                rows[b].append((tokens[row], p_token[row], q_token[row], tv[row], draft_hidden[row], target_hidden[row], ctx.weights[row]))
            finished = torch.isin(tokens, eos)  # [A]
            for b in active[finished.cpu()].tolist():
                ended[b] = True
            if finished.all():
                break
            if finished.any():  # the finished rows leave the batch
                keep = (~finished).nonzero()[:, 0].to(model_device)  # [A']
                target.keep(keep)
                draft.keep(keep)
                active, mask, positions, tokens = active[keep.cpu()], mask[keep], positions[keep], tokens[keep.to(device)]
            ids = tokens[:, None].to(model_device)  # [A, 1]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)  # [A, cached + 1]
            positions = positions[:, -1:] + 1  # [A, 1]
    # Stacking outside inference mode gives ordinary tensors the loss can use with autograd.
    results = []
    for b in range(batch):
        token, p_token, q_token, tv, draft_h, target_h, weights = (torch.stack(column) for column in zip(*rows[b]))
        results.append(Rollout([int(t) for t in token], p_token, q_token, tv, draft_h, target_h, weights, ended[b]))
    return results


def completion_text(pair: ModelPair, rollout_: Rollout) -> str:
    """The text a reward sees: the sampled tokens without a final EOS, special tokens skipped."""
    ids = rollout_.tokens[:-1] if rollout_.ended else rollout_.tokens
    return pair.tokenizer.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- objective


@dataclass
class RewardBaseline:
    """The REINFORCE baseline (docs/method.md §5).

    - "running": an exponential moving average of past batch-mean rewards, updated *after*
      each step, so a batch's baseline never depends on its own rewards; the first batch
      (no history yet) uses its own mean.
    - "batch": the current batch's mean reward (advantages sum to zero in each batch).
    - "group": with several samples per prompt, each sample's baseline is the mean reward of
      the *other* samples of its prompt (leave-one-out, as in RLOO). It stays unbiased, since it
      does not depend on the sample's own reward, and it removes the prompt's difficulty from
      the advantage: on GSM8K most of the reward variance comes from which problem was drawn.
    """

    kind: str = "running"
    decay: float = 0.9
    value: float | None = None  # the running average so far (None before the first batch)

    def current(self, rewards: torch.Tensor, group_size: int = 1) -> torch.Tensor:
        """The baseline of each reward [B]; rows come in groups of `group_size` samples of one prompt."""
        if self.kind == "group":
            groups = rewards.reshape(-1, group_size)  # [P, K]
            return ((groups.sum(-1, keepdim=True) - groups) / (group_size - 1)).reshape(-1)  # [B] leave-one-out means
        value = float(rewards.mean()) if self.kind == "batch" or self.value is None else self.value
        return torch.full_like(rewards, value)

    def update(self, rewards: torch.Tensor) -> None:
        """Fold a finished batch's mean reward into the running average."""
        mean = float(rewards.mean())
        self.value = mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean


@dataclass
class LossTerms:
    loss: torch.Tensor  # [] what is minimised: (L_pg - lam * S) / normaliser
    pg: torch.Tensor  # [] L_pg
    acceptance: torch.Tensor  # [] S = mean_b sum_t (1 - w_t TV_t)
    weights: torch.Tensor  # [T_total] w_t with gradient


def policy_loss(
    head: EnsembleHead, rollouts: Sequence[Rollout], advantages: torch.Tensor, lam: float, normaliser: float
) -> LossTerms:
    """docs/method.md §5 on a batch of rollouts, recomputed with gradients through the head alone.

    advantages: [B] (R_b - baseline_b). `normaliser` (max_new_tokens) is a constant, so it rescales
    both terms alike and leaves their balance (lam) unchanged.
    """
    device = head.linear.weight.device
    draft_hidden = torch.cat([r.draft_hidden for r in rollouts])  # [T_total, H_d]
    target_hidden = torch.cat([r.target_hidden for r in rollouts])  # [T_total, H_t]
    p_token = torch.cat([r.p_token for r in rollouts])  # [T_total]
    q_token = torch.cat([r.q_token for r in rollouts])  # [T_total]
    tv = torch.cat([r.tv for r in rollouts])  # [T_total]
    lengths = torch.tensor([r.length for r in rollouts], device=device)  # [B]
    sequence = torch.repeat_interleave(torch.arange(len(rollouts), device=device), lengths)  # [T_total] -> b
    w = head(draft_hidden, target_hidden)  # [T_total]
    log_v = torch.log((w * p_token + (1 - w) * q_token).clamp_min(torch.finfo(w.dtype).tiny))  # log v_t(y_t)
    per_sequence = torch.zeros(len(rollouts), device=device, dtype=w.dtype)  # [B]
    log_v_sum = per_sequence.index_add(0, sequence, log_v)  # [B]
    accept_sum = per_sequence.index_add(0, sequence, 1 - w * tv)  # [B]
    pg = -(advantages.to(device, w.dtype) * log_v_sum).mean()
    acceptance = accept_sum.mean()
    return LossTerms((pg - lam * acceptance) / normaliser, pg, acceptance, w)


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
    path = out_dir / RUN_FILE
    if not path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        return
    stored = json.loads(path.read_text())
    differing = []
    for section, current in record.items():
        before = stored.get(section)
        if isinstance(current, dict) and isinstance(before, dict):
            defaults = asdict(TrainSettings()) if section == "settings" else {}
            differing += [
                f"{key}: {before.get(key, defaults.get(key))!r} there, {value!r} now"
                for key, value in current.items()
                if before.get(key, defaults.get(key)) != value
            ]
        elif before != current:
            differing.append(f"{section}: {before!r} there, {current!r} now")
    if differing:
        raise UserInputError(
            f"{out_dir} holds a training run with other settings ({'; '.join(differing)}); "
            "rerun with the same settings to resume it, or choose another --out"
        )


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


def encode_prompts(
    pair: ModelPair, examples: Sequence[Any], prompt_fn: PromptFn, max_new_tokens: int
) -> tuple[list[tuple[Any, list[int]]], int]:
    """(example, chat-templated prompt ids) for prompts that leave room for max_new_tokens; and how many were skipped."""
    from .generation import encode_prompt

    kept, skipped = [], 0
    for example in examples:
        try:
            ids = encode_prompt(pair, prompt_fn(example))
        except UserInputError:
            ids = None
        if ids is None or len(ids) + max_new_tokens > pair.context_window:
            skipped += 1
        else:
            kept.append((example, ids))
    return kept, skipped


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
    prompts, skipped = encode_prompts(pair, examples[: settings.prompts], prompt_fn, settings.max_new_tokens)
    if not prompts:
        raise UserInputError("no training prompt fits the context window with --max-new-tokens room")
    if skipped:
        print(f"note: skipping {skipped} prompts too long for the context window", file=sys.stderr)
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


# ----------------------------------------------------------------------------- tasks and CLI


def task_reward(task: Any) -> RewardFn:
    """The task's pure scorer as a reward in [0, 1] (percent metrics divided by 100)."""
    scale = 100.0 if task.metric_name in PERCENT_METRICS else 1.0
    return lambda example, completion: task.score(example, completion) / scale


def load_training_examples(task_name: str, n: int, data_dir: str | None) -> tuple[Any, list[Any]]:
    """(task, its first n training examples); a task without a train split is an error (no training on test data)."""
    from .tasks import get_task

    task = get_task(task_name)
    if "train" not in task.splits:
        raise UserInputError(f"task {task_name} has no train split (it has {', '.join(task.splits)}); heads are never trained on test data")
    examples = task.load("train", n, data_dir)
    if len(examples) < n:
        raise UserInputError(f"--prompts {n} asks for more examples than {task_name}'s train split has ({len(examples)})")
    return task, examples


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    names = {f.name for f in fields(TrainSettings)}
    return TrainSettings(**{name: getattr(args, name) for name in names if getattr(args, name, None) is not None})


def cmd_train(args: argparse.Namespace) -> int:
    from .models import load_pair

    settings = settings_from_args(args)
    if args.checkpoint_every < 1:
        raise UserInputError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    task, examples = load_training_examples(args.task, settings.prompts, args.data_dir)  # before the slow model load
    if args.backend == "llama.cpp" or args.draft == "ngram":
        raise UserInputError("training needs the torch backend and a draft model (batched rollouts over both models' KV caches); "
                             "use --backend torch (or auto) and a draft model")
    if task.metric_name == "pass@1":
        from .sandbox import require_isolation

        require_isolation(args.unsafe_sandbox)  # rewards run model-written code
    pair = load_pair(args.target, args.draft, args.dtype, device=args.device, backend="torch")
    head = train_head(
        pair, examples, task.prompt, task_reward(task), settings, args.out,
        checkpoint_every=args.checkpoint_every, stop_after=args.stop_after,
        time_limit_s=args.time_limit * 60 if args.time_limit else None,
    )
    out = Path(args.out)
    if head.config.extra.get("training"):  # set when the finished head is saved
        print(f"head saved to {out / HEAD_NAME} (use: --method diversed --head {out / HEAD_NAME})", file=sys.stderr)
    else:
        print(f"stopped early; rerun the same command to resume from {out / CHECKPOINT_DIR}", file=sys.stderr)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` to the `diversed` command line."""
    from .cli import add_model_args

    defaults = TrainSettings()
    tr = subparsers.add_parser("train", help="train an ensemble head for a task (sequence-level RL, docs/method.md §5)")
    tr.add_argument("--task", required=True, help="gsm8k, mbpp or xsum (any task with a train split)")
    tr.add_argument("--out", required=True, help="run folder: checkpoints, train_log.jsonl, and the head (out/head); a run there resumes")
    tr.add_argument("--data-dir", help="folder with the task's JSONL files (default: $DIVERSED_DATA_DIR)")
    tr.add_argument("--unsafe-sandbox", action="store_true", help="run model-written code even where the sandbox cannot isolate it (docs/evaluation.md)")
    add_model_args(tr)
    group = tr.add_argument_group("training (see docs/training.md)")
    group.add_argument("--prompts", type=int, default=defaults.prompts, help="first N training examples (default %(default)s)")
    group.add_argument("--epochs", type=int, default=defaults.epochs, help="default %(default)s")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, help="prompts per step (default %(default)s)")
    group.add_argument(
        "--samples-per-prompt", type=int, default=defaults.samples_per_prompt,
        help="completions per prompt, sharing one prefill (default %(default)s; use >= 2 with --baseline group)",
    )
    group.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="rollout length cap (default %(default)s)")
    group.add_argument("--temperature", "-T", type=float, default=defaults.temperature, help="> 0 (default %(default)s)")
    group.add_argument("--top-k", type=int, default=defaults.top_k, help="0 disables (default)")
    group.add_argument("--top-p", type=float, default=defaults.top_p, help="1.0 disables (default)")
    group.add_argument("--lam", type=float, default=defaults.lam, help="weight of the acceptance term S, maximised (default %(default)s)")
    group.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default %(default)s)")
    group.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up steps (default %(default)s)")
    group.add_argument("--baseline", choices=BASELINES, default=defaults.baseline, help="reward baseline (default %(default)s)")
    group.add_argument("--seed", type=int, default=defaults.seed, help="default %(default)s")
    run = tr.add_argument_group("run control (does not change the result)")
    run.add_argument("--checkpoint-every", type=int, default=1, help="steps between checkpoints (default %(default)s)")
    run.add_argument("--stop-after", type=int, help="stop (resumably) after this many steps in total")
    run.add_argument("--time-limit", type=float, help="stop (resumably) after about this many minutes")
    tr.set_defaults(handler=cmd_train)
