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

Modules: rollouts.py (sampling from the ensemble), objective.py (baseline and loss), loop.py
(settings, steps, checkpoints, `train_head`). Command line: `diversed train`
(diversed/commands/train.py, docs/training.md).
"""

from .loop import (CHECKPOINT_DIR, HEAD_NAME, LOG_FILE, RUN_FILE, TrainSettings, TrainState, batch_for_step, checkpoint_paths,
                   load_checkpoint, load_training_examples, save_checkpoint, seeded_generator, train_head, train_step)
from .objective import LossTerms, RewardBaseline, policy_loss, task_reward
from .rollouts import Rollout, completion_text, rollout, rollout_batch

__all__ = [
    "CHECKPOINT_DIR", "HEAD_NAME", "LOG_FILE", "RUN_FILE", "TrainSettings", "TrainState", "batch_for_step", "checkpoint_paths",
    "load_checkpoint", "load_training_examples", "save_checkpoint", "seeded_generator", "train_head", "train_step",
    "LossTerms", "RewardBaseline", "policy_loss", "task_reward", "Rollout", "completion_text", "rollout", "rollout_batch",
]
