"""The guard: exact verification (v = p) at the positions that decide how a response ends.

A relaxed method trusts the draft everywhere; the guard takes that trust back where either
model gives the stop tokens, or tokens a task names (an answer marker such as `####`),
noticeable mass (docs/method.md §4, "Guard"). Position i is *guarded* when

    max(p_i(G), q_i(G)) >= tau,    G = the stop tokens and the named tokens,

and a guarded position is verified as `exact` verifies it; every other position as the
method it wraps. The rule reads p, q and the tokenizer only, never a task's labels, so it
composes with every relaxed method, both proposers, lockstep evaluation and the vLLM plugin:
`Guarded` is a verifier like the others, built by `methods.make_verifier` when a spec gives a
guard knob (`static:0.5:0.05`, `--guard 0.05`, `speculative.guard`).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from .errors import UserInputError
from .knobs import Knob
from .verifiers import EMPTY_CONTEXT, Exact, Verifier, VerifyContext, VerifyTables

# Why 0.05: below it a relaxed method can move the probability of stopping (or of a named token)
# at a position by less than tau, since p(G), q(G) and any mixture of them all stay below tau
# there; above it the target alone decides. Positions that reach it should be few (ends of
# answers, the line before a marker), which bounds what the guard costs (docs/method.md §4).
GUARD = Knob("guard", float, 0.05,
             "the guard's threshold tau: verify exactly (w = 1) where either model puts at least this mass on the stop "
             "or guarded tokens (the guard is on once --guard or --guard-tokens is given)", interval=(0, 1, "(]"))
DIGITS = "<digits>"  # the opt-in class: every token whose text holds a decimal digit
GUARD_TOKENS = Knob("guard_tokens", str, None,
                    f"strings whose tokens the guard also watches, space-separated ({DIGITS}: every token with a digit)")
GUARD_KNOBS: tuple[Knob, ...] = (GUARD, GUARD_TOKENS)

_DIGIT = re.compile(r"\d")
_EXACT = Exact()


@dataclass(frozen=True)
class GuardVocabulary:
    """What the guard reads from a model pair: its tokenizer and the ids that end a response."""

    tokenizer: Any
    stop_token_ids: tuple[int, ...]


def guard_given(knobs: dict[str, Any]) -> bool:
    """Whether a method's knobs (canonical names) switch the guard on."""
    return any(knob.name in knobs for knob in GUARD_KNOBS)


def named_strings(text: str) -> list[str]:
    """The strings of a `guard_tokens` value, in order, without repeats."""
    return list(dict.fromkeys(text.split()))


def guarded_token_ids(vocabulary: GuardVocabulary, named: str) -> tuple[int, ...]:
    """The token set G: the stop tokens, and for each named string every token whose text holds it
    (so `####` also covers ` ####`) plus the first token of its own encoding (a string longer
    than any token). `<digits>` names every token with a decimal digit. The vocabulary's texts
    are decoded once per tokenizer (`_texts`)."""
    ids = set(vocabulary.stop_token_ids)
    strings = named_strings(named)
    if strings:
        texts = _texts(vocabulary.tokenizer)
        for string in strings:
            if string == DIGITS:
                ids.update(i for i, text in enumerate(texts) if _DIGIT.search(text))
                continue
            ids.update(i for i, text in enumerate(texts) if string in text)
            encoded = vocabulary.tokenizer(string, add_special_tokens=False).input_ids
            ids.update(encoded[:1])
    if not ids:
        raise UserInputError("the guard has no tokens to watch: this tokenizer names no stop token and no {guard_tokens} "
                             "were given", params=("guard_tokens",))
    return tuple(sorted(ids))


def _token_texts(tokenizer: Any) -> list[str]:
    """Each token's text (special tokens included), by id."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


# Each tokenizer's token texts, decoded on first use: a vLLM worker builds a guard per kind of
# request (plugin.py keeps them), and decoding a whole vocabulary costs more than the rest.
_TEXTS: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()


def _texts(tokenizer: Any) -> list[str]:
    try:
        texts = _TEXTS.get(tokenizer)
    except TypeError:  # a tokenizer that cannot key a weak dictionary: decoded each time
        return _token_texts(tokenizer)
    if texts is None:
        texts = _TEXTS[tokenizer] = _token_texts(tokenizer)
    return texts


@dataclass(frozen=True)
class Guarded(Verifier):
    """Exact verification where max(p(G), q(G)) >= threshold, `inner`'s verification elsewhere.

    Per position the emitted law is p (guarded) or the inner method's law (not), so every
    identity of the inner method holds at its positions and `exact`'s at the others.
    """

    inner: Verifier
    token_ids: tuple[int, ...]
    threshold: float = GUARD.default
    tokens: str = ""  # the named strings as given (what `describe` shows)
    # token_ids as a tensor per device, made on first use: `guarded` runs at every verification
    _ids: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        GUARD.check(self.threshold)
        if not self.token_ids:
            raise UserInputError("the guard has no tokens to watch", params=("guard_tokens",))

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def needs_hidden_states(self) -> bool:  # type: ignore[override]
        return self.inner.needs_hidden_states

    def context(self, draft_hidden, target_hidden) -> VerifyContext:
        return self.inner.context(draft_hidden, target_hidden)

    def guarded(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Which positions are verified exactly. p, q: [N, V] -> bool [N]."""
        ids = self._ids.get(p.device)
        if ids is None:
            ids = self._ids[p.device] = torch.tensor(self.token_ids, device=p.device)
        ids = ids[ids < p.shape[-1]]  # a tokenizer may name ids past a model's vocabulary
        mass = torch.maximum(p.index_select(-1, ids).sum(-1), q.index_select(-1, ids).sum(-1))  # [N]
        return mass >= self.threshold

    def _choose(self, guarded: torch.Tensor, exact: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
        """Row i of `exact` where position i is guarded, else of `inner` ([N] or [N, V])."""
        mask = guarded.view(-1, *([1] * (inner.dim() - 1)))
        return torch.where(mask, exact, inner)

    def tables(self, p, q, ctx) -> VerifyTables:
        guarded = self.guarded(p, q)
        inner = self.inner.tables(p, q, ctx)
        if not bool(guarded.any()):
            return inner
        exact = _EXACT.tables(p, q, EMPTY_CONTEXT)
        return VerifyTables(*(self._choose(guarded, e, i) for e, i in zip(exact, inner)))

    def acceptance(self, p, q, ctx):
        return self._choose(self.guarded(p, q), _EXACT.acceptance(p, q, EMPTY_CONTEXT), self.inner.acceptance(p, q, ctx))

    def residual(self, p, q, ctx):
        return self._choose(self.guarded(p, q), _EXACT.residual(p, q, EMPTY_CONTEXT), self.inner.residual(p, q, ctx))

    def greedy_accept(self, p, q, drafted, ctx):
        exact = _EXACT.greedy_accept(p, q, drafted, EMPTY_CONTEXT)
        return self._choose(self.guarded(p, q), exact, self.inner.greedy_accept(p, q, drafted, ctx))

    def greedy_recovery(self, p, q, ctx):
        exact = _EXACT.greedy_recovery(p, q, EMPTY_CONTEXT)
        return self._choose(self.guarded(p, q), exact, self.inner.greedy_recovery(p, q, ctx))

    def describe(self) -> str:
        named = f", {self.tokens}" if self.tokens else ""
        return f"{self.inner.describe()} guarded(tau={self.threshold:g}{named})"


def guard(inner: Verifier, knobs: dict[str, Any], vocabulary: GuardVocabulary | None) -> Verifier:
    """`inner` guarded as `knobs` (canonical names) say, or `inner` itself when they give no guard knob."""
    if not guard_given(knobs):
        return inner
    if vocabulary is None:
        raise UserInputError("{guard} needs the pair's tokenizer (build the verifier with generation.build_verifier)",
                             params=("guard",))
    named = knobs.get(GUARD_TOKENS.name) or ""
    return Guarded(inner, guarded_token_ids(vocabulary, named), knobs.get(GUARD.name, GUARD.default), named)


def vocabulary_of(tokenizer: Any, stop_token_ids: Iterable[int]) -> GuardVocabulary:
    return GuardVocabulary(tokenizer, tuple(sorted(set(stop_token_ids))))
