"""Text in, text out: prompts, methods, stop strings and streaming over the token engine.

This is the layer the CLI, the evaluator and the server all call:

    pair = load_pair()                       # the embedded default pair
    spec = MethodSpec("static", weight=0.9)
    result = generate(pair, "Write a haiku", spec, GenerationConfig(max_new_tokens=64, seed=0))
    print(result.text, result.metrics.acceptance_rate)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence, TypeVar

from .chat_encoding import encode_chat
from .draft_length import AdaptiveDraftLength, DraftLengthPolicy, FixedDraftLength
from .engine import AUTO, GenerationConfig, RoundClock, decode
from .errors import UserInputError
from .guard import vocabulary_of
from .head import DynamicEnsemble, load_head, resolve_head_path
from .methods import METHODS, MethodSpec, check_complete, head_kind, make_verifier
from .metrics import Metrics
from .models import ModelPair
from .proposers import DRAFT_MODEL, Proposer, ProposerKind, get_proposer
from .verifiers import Verifier

# The shipped head `diversed` uses when the user names no method. Only a head shown to help
# across tasks belongs here (docs/heads.md); task-specific heads are opt-in (--head NAME).
DEFAULT_HEAD: str | None = None
T = TypeVar("T")


class PromptEncoder(Protocol):
    """What turns a prompt into ids: a `ModelPair`, or a tokenizer and window from another engine."""

    tokenizer: Any

    @property
    def context_window(self) -> int: ...


def default_method(pair: ModelPair, default_head: str | None = DEFAULT_HEAD, proposer: str = DRAFT_MODEL.name) -> tuple[MethodSpec, str]:
    """The method used when the user names none, and a sentence saying why.

    Without a designated head, each proposer kind names its own default (proposers.py), chosen
    by issue 23's written rule from the confirmatory run (tests/test_default_rule.py).
    """
    from .head import HeadMismatchError

    if default_head is not None:
        try:
            load_head(default_head, pair.signature())
        except HeadMismatchError:
            pass
        else:
            return MethodSpec(DynamicEnsemble.name, head=default_head), f"using the ensemble head {default_head!r} (--method diversed)"
    kind = get_proposer(proposer)
    return MethodSpec.parse(kind.default_method), kind.default_reason


def check_spec(spec: MethodSpec) -> None:
    """Everything about a spec that can be checked before a model loads: required knobs, head files."""
    check_complete(spec)
    if head_kind(spec.method) is not None:
        resolve_head_path(spec.head)


def check_compatible(verifier: Verifier | None, proposer: ProposerKind, pair: ModelPair) -> None:
    """The one check that a method, a proposer and a pair can run together (a one-line error if not)."""
    if verifier is None:
        return  # `ar`: the target alone
    if proposer.needs_draft_model and pair.draft is None:
        raise UserInputError(f"--method {verifier.name} needs a draft model (or --draft ngram)")
    missing = proposer.missing_hidden_states(pair) if verifier.needs_hidden_states else None
    if missing is not None:
        raise UserInputError(f"--method {verifier.name} needs {missing}")


def build_verifier(pair: ModelPair, spec: MethodSpec, proposer: str = DRAFT_MODEL.name) -> Verifier | None:
    """The verifier for a method spec (None for `ar`), loading and checking a head if needed."""
    kind = head_kind(spec.method)
    head = _load_method_head(pair, spec) if kind is not None and spec.head else None
    if head is not None and not isinstance(head, kind):
        owner = next(method for method in METHODS if isinstance(head, head_kind(method) or ()))
        raise UserInputError(f"{spec.head!r} is {head.kind}; use {owner}:{spec.head}")
    vocabulary = vocabulary_of(pair.tokenizer, pair.eos_token_ids)  # what a guard watches
    verifier = make_verifier(spec.method, head=head, vocabulary=vocabulary, **spec.verifier_knobs())
    check_compatible(verifier, get_proposer(proposer), pair)
    return verifier


def _load_method_head(pair: ModelPair, spec: MethodSpec) -> Any:
    """The spec's head, checked against the pair; without a draft model (prompt lookup) only
    the target can be checked, and a head that reads hidden states is refused afterwards."""
    if pair.draft is None:
        return load_head(spec.head, target=pair.target_name).to(pair.device)
    return load_head(spec.head, pair.signature()).to(pair.device)


def make_proposer(pair: ModelPair, verifier: Verifier | None, config: GenerationConfig) -> Proposer | None:
    """Where drafted tokens come from (None for `ar`); refuses combinations that cannot work."""
    if verifier is None:
        return None
    kind = get_proposer(config.proposer)
    check_compatible(verifier, kind, pair)
    return kind.make(pair, config.draft_confidence)


def make_policy(pair: ModelPair, config: GenerationConfig) -> DraftLengthPolicy:
    """The draft length rule: fixed N, or `auto` from this machine's measured step costs."""
    if config.draft_length != AUTO:
        return FixedDraftLength(int(config.draft_length))
    from .calibration import step_costs

    return AdaptiveDraftLength(step_costs(pair, config.max_draft_length, get_proposer(config.proposer)), config.max_draft_length)


def require_utf8(prompt: str | list[dict[str, str]]) -> None:
    """A one-line error for text that is not valid UTF-8 (bytes a shell passed through, lone surrogates)."""
    texts = [prompt] if isinstance(prompt, str) else [str(m.get("content", "")) for m in prompt]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise UserInputError("the prompt is not valid UTF-8 text") from None


def encode_prompt(pair: PromptEncoder, prompt: str | list[dict[str, str]], raw: bool = False) -> list[int]:
    """Token ids for a prompt: wrapped in the target's chat template unless `raw`.

    `prompt` may also be a list of chat messages ({"role", "content"}).
    """
    tokenizer, context_window = pair.tokenizer, pair.context_window
    if isinstance(prompt, str) and not prompt.strip():
        raise UserInputError("the prompt is empty")
    require_utf8(prompt)
    if raw:
        if not isinstance(prompt, str):
            raise UserInputError("a raw prompt must be a string")
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
    else:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not getattr(tokenizer, "chat_template", None):
            raise UserInputError("this target has no chat template; pass the prompt as-is (--raw)")
        ids = encode_chat(tokenizer, messages)  # contents cannot produce special tokens
    if len(ids) >= context_window:
        raise UserInputError(f"the prompt is {len(ids)} tokens; the target's context window is {context_window}")
    return ids


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # the new tokens only
    method: str
    metrics: Metrics
    finish_reason: str  # "stop" (EOS or a stop string) or "length"

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "method": self.method,
            "finish_reason": self.finish_reason,
            "metrics": self.metrics.to_dict(),
        }


@dataclass
class Generation:
    """A generation in progress: iterate for text deltas; `result` is set when it ends.

    Text is released only once it cannot change: an incomplete UTF-8 sequence and any tail
    that could still become a stop string are held back.
    """

    pair: ModelPair
    prompt_ids: list[int]
    verifier: Verifier | None
    config: GenerationConfig
    method: str
    proposer: Proposer | None = None
    policy: DraftLengthPolicy | None = None
    metrics: Metrics = field(default_factory=Metrics)
    result: GenerationResult | None = None
    text: IncrementalText | None = None  # the emitted tokens and their text, once iteration starts

    def fitted_config(self) -> GenerationConfig:
        """The settings with max_new_tokens cut to what the context window leaves after the prompt
        and the longest draft (a UserInputError when it leaves nothing)."""
        config = self.config
        budget = self.pair.context_window - len(self.prompt_ids) - config.longest_draft - 1
        if budget < 1:
            raise UserInputError(f"the prompt ({len(self.prompt_ids)} tokens) leaves no room in the context window ({self.pair.context_window})")
        return dataclasses.replace(config, max_new_tokens=budget) if config.max_new_tokens > budget else config

    def __iter__(self) -> Iterator[str]:
        config = self.fitted_config()
        self.text = text = IncrementalText(self.pair.tokenizer)
        release = TextRelease(config.stop)
        finish_reason = "length"
        clock = RoundClock()
        tokens = decode(
            self.pair.runner("target", longest_feed=config.longest_draft + 1),
            self.proposer,
            self.prompt_ids,
            self.verifier,
            config,
            eos_token_ids=self.pair.eos_token_ids,
            metrics=self.metrics,
            policy=self.policy,
            clock=clock,
        )
        for chunk in tokens:
            current = text.extend(chunk)
            cut = release.find_stop(current)
            if cut is not None:
                finish_reason = "stop"
                tokens.close()
                yield from release.final(current[:cut])
                break
            yield from release.safe(current)
        else:
            if len(text.ids) < config.max_new_tokens:
                finish_reason = "stop"  # EOS
            yield from release.final(text.text)
        from .calibration import correct_costs

        correct_costs(self.pair, clock.forwards)  # a calibration taken under load is corrected by this run's timings
        self.result = GenerationResult(release.released, text.ids, self.method, self.metrics, finish_reason)


class TextRelease:
    """A streamed text's deltas, released only once they cannot change: an incomplete UTF-8
    sequence and any tail that could still become a stop string are held back."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.longest_stop = max((len(s) for s in stops), default=0)
        self.released = ""

    def find_stop(self, current: str) -> int | None:
        """Where a stop string begins in `current`, looking only where one may have newly appeared
        (one wholly inside the released text would have been found earlier)."""
        return first_stop(current, self.stops, start=max(0, len(self.released) - self.longest_stop + 1))

    def safe(self, current: str) -> Iterator[str]:
        """The delta of `current` (the whole text so far) that can no longer change (zero or one string)."""
        safe = len(current) - max(self.longest_stop - 1, 0)
        while safe > len(self.released) and current[safe - 1] == "\ufffd":
            safe -= 1
        if safe > len(self.released):
            yield current[len(self.released) : safe]
            self.released = current[:safe]

    def final(self, text: str) -> Iterator[str]:
        """The rest of the final `text` (zero or one string)."""
        if len(text) > len(self.released):
            yield text[len(self.released) :]
        self.released = text


class IncrementalText:
    """The text of a growing list of token ids, decoding only a window at its end.

    As vLLM's incremental detokenizer: each call decodes the tokens since the last settled
    point together with the chunk before it (context, for tokenizers that render a token
    differently at the start of a text), and keeps only the new characters. Text settles once
    it no longer ends in an incomplete UTF-8 sequence (U+FFFD). Each token is decoded a
    bounded number of times, instead of the whole text once per round.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.settled = ""  # the text of ids[:read_offset]; more tokens never change it
        self.pending = ""  # the text of ids[read_offset:], ending in an incomplete character
        self.prefix_offset = 0  # the window starts here: ids[prefix_offset:read_offset] are context
        self.read_offset = 0

    @property
    def text(self) -> str:
        return self.settled + self.pending

    def extend(self, ids: list[int]) -> str:
        """Append token ids; -> the whole text so far (what decoding every id at once gives)."""
        self.ids.extend(ids)
        context = self._decode(self.prefix_offset, self.read_offset)
        new = self._decode(self.prefix_offset, len(self.ids))[len(context) :]
        if new.endswith("\ufffd"):
            self.pending = new  # wait for the rest of the character
        else:
            self.settled += new
            self.pending = ""
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self.text

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True) if end > start else ""


def first_stop(text: str, stops: tuple[str, ...] | list[str], start: int = 0) -> int | None:
    """Where the earliest stop string begins in text[start:] (an index into text), or None."""
    positions = [at for at in (text.find(s, start) for s in stops if s) if at >= 0]
    return min(positions) if positions else None


def fitting_prompts(pair: PromptEncoder, items: Sequence[T], prompt_of: Callable[[T], Any], room: int, raw: bool = False
                    ) -> tuple[list[tuple[T, list[int]]], list[T]]:
    """(item, prompt ids) for each item whose prompt leaves `room` tokens in the context; and the items skipped.

    A prompt that cannot be encoded (empty, too long) is skipped too. What is skipped depends on
    the prompt only, so every method of an evaluation skips the same examples.
    """
    kept, skipped = [], []
    for item in items:
        try:
            ids = encode_prompt(pair, prompt_of(item), raw)
        except UserInputError:
            ids = None
        if ids is None or len(ids) + room > pair.context_window:
            skipped.append(item)
        else:
            kept.append((item, ids))
    return kept, skipped


def start_generation(
    pair: ModelPair,
    prompt: str | list[int] | list[dict[str, str]],
    spec: MethodSpec,
    config: GenerationConfig = GenerationConfig(),
    *,
    raw: bool = False,
    verifier: Verifier | None = None,
) -> Generation:
    """Prepare a generation (nothing runs until it is iterated)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        prompt_ids = list(prompt)  # already token ids
        if len(prompt_ids) >= pair.context_window:
            raise UserInputError(f"the prompt is {len(prompt_ids)} tokens; the context window is {pair.context_window}")
    else:
        prompt_ids = encode_prompt(pair, prompt, raw)  # type: ignore[arg-type]
    if verifier is None:
        verifier = build_verifier(pair, spec, config.proposer)
    proposer = make_proposer(pair, verifier, config)  # refuses impossible combinations before anything runs
    # `ar` drafts nothing, so the engine never consults its policy; N = "auto" still needs one to be given.
    policy = make_policy(pair, config) if proposer is not None else FixedDraftLength(1)
    return Generation(pair, prompt_ids, verifier, config, spec.label, proposer, policy)


def generate(
    pair: ModelPair,
    prompt: str | list[int] | list[dict[str, str]],
    spec: MethodSpec,
    config: GenerationConfig = GenerationConfig(),
    *,
    raw: bool = False,
    verifier: Verifier | None = None,
) -> GenerationResult:
    """Generate to the end and return text, new token ids, method and metrics."""
    generation = start_generation(pair, prompt, spec, config, raw=raw, verifier=verifier)
    for _ in generation:
        pass
    assert generation.result is not None
    return generation.result
