"""Lockstep evaluation: many rows of an evaluation decoded at once (`diversed.lockstep` has the
law and the batch); here, which rows join when, and the batch size.

Rows join in the order given; as rows finish, waiting rows take their places (the batch
stays nearly full), and the rows of one prompt join together so that its prefill is shared.
Eval rows say `lockstep: true`, and summaries leave their speeds empty: a row's `seconds` is
its share of batch time, not a method's decoding speed.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, Sequence

from ..engine import GenerationConfig
from ..errors import UserInputError
from ..generation import GenerationResult
from ..lockstep import Batch, LockstepRow, check_batch_size, lockstep_refusal, new_state
from ..models import ModelPair

__all__ = ["DEFAULT_BATCH", "LockstepRow", "check_lockstep", "lockstep_generate", "lockstep_refusal"]

DEFAULT_BATCH = 64  # rows a step; docs/performance.md ("Lockstep batches") has the measurement behind it


def check_lockstep(pair: ModelPair, config: GenerationConfig) -> None:
    """Refuse what lockstep evaluation cannot do, with one line each."""
    refusal = lockstep_refusal(pair.backend, config)
    if refusal is not None:
        raise UserInputError(refusal)


def lockstep_generate(
    pair: ModelPair, rows: Sequence[LockstepRow], config: GenerationConfig, *, batch_size: int = DEFAULT_BATCH
) -> Iterator[tuple[LockstepRow, GenerationResult]]:
    """Generate every row, up to `batch_size` rows at once; yield (row, result) as each finishes.

    Rows join in the order given, and as rows finish, waiting rows take their places, so the
    batch stays nearly full (a CPU's matrix products cost less per row in a fuller batch). Rows
    that share a prompt should be adjacent: they join together, prefill their prompt once and
    copy its cache. `config.seed` is ignored; each row brings its own, so the rows beside it
    change a row's rounding, never its law.
    """
    check_lockstep(pair, config)
    check_batch_size(batch_size)
    waiting = deque(rows)
    # Each join copies the whole cache once, so wait until a few places are free.
    refill_at = max(1, batch_size // 8)
    batch = Batch(pair)
    while waiting or batch.states:
        free = batch_size - len(batch.states)
        joining = _take(waiting, free, into_empty=not batch.states) if waiting and free >= min(refill_at, len(waiting)) else []
        if joining:
            batch.join([new_state(pair, row, config) for row in joining])
        for state in batch.step():
            yield state.row, state.result()


def _take(waiting: deque[LockstepRow], free: int, *, into_empty: bool) -> list[LockstepRow]:
    """The waiting rows that join now: whole runs of adjacent rows that share a prompt, as many
    as fit in `free` places (so a prompt is prefilled once, not once per join); into an empty
    batch, the first `free` rows however they split."""
    taken: list[LockstepRow] = []
    while waiting:
        run = 1
        while run < len(waiting) and waiting[run].prompt_ids == waiting[0].prompt_ids:
            run += 1
        if len(taken) + run > free:
            break
        taken += [waiting.popleft() for _ in range(run)]
    if not taken and into_empty:
        taken = [waiting.popleft() for _ in range(min(free, len(waiting)))]
    return taken
