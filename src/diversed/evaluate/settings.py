"""The settings of an evaluation run: everything that decides what a row contains."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..engine import GenerationConfig
from ..run_files import check_settings as check_recorded_settings
from ..run_files import RunSettings
from ..sampling import SamplingParams, derived_seed
from ..tasks import Task

SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class EvalSettings(RunSettings):
    """Everything that decides what a row contains. A resumed run must match them exactly.

    The number of examples and the method list are not settings: a rerun may add either,
    and only the missing rows are computed.
    """

    top_k: int
    top_p: float
    draft_length: int
    max_new_tokens: int
    seed: int
    raw: bool = False
    draft_confidence: float = 0.0
    prompt_version: int = 1  # the task's Task.prompt_version
    backend: str = "torch"  # runs before the llama.cpp backend existed were torch runs
    proposer: str = "model"

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p)

    def generation_config(self, task: Task, example_id: str) -> GenerationConfig:
        seed = example_seed(self.seed, example_id)
        return GenerationConfig(self.max_new_tokens, self.draft_length, self.sampling, seed, task.stop(self.raw),
                                draft_confidence=self.draft_confidence, proposer=self.proposer)


def example_seed(seed: int, example_id: str) -> int:
    """The sampling seed of one example: the same for every method, independent of order."""
    return derived_seed(seed, example_id, bits=32)


def check_settings(out_dir: Path, settings: EvalSettings) -> None:
    """Record the settings of a new run; refuse to mix rows of runs that differ."""
    defaults = {f.name: f.default for f in fields(EvalSettings)}  # settings added later keep their default
    check_recorded_settings(out_dir / SETTINGS_FILE, asdict(settings), defaults)
