"""Draft/target pairs: two models that share one vocabulary, loaded through one backend.

Model specs: an embedded model name (the default pair, `embedded.py`), a local directory, a
.gguf file or a Hugging Face hub id. `load_pair` takes a concrete backend; `--backend auto`
is settled before it, by `calibration.choose_backend`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .embedded import DEFAULT_DRAFT, DEFAULT_TARGET
from .errors import PairMismatchError, UserInputError
from .head import PairSignature
from .runners import Backend, ModelFacts, ModelRunner, get_backend
from .runners.hf import DEFAULT_DTYPE, TORCH, resolve_device


@dataclass
class ModelPair:
    """A target and a draft that share one vocabulary, with the tokenizer they share.

    `target` and `draft` are the backend's models (a transformers PreTrainedModel for
    `torch`, a `LlamaCppModel` for `llama.cpp`); everything above the models reaches them
    through `runner`, `batch` and the facts below, which ask the backend object.
    """

    target: Any
    draft: Any | None  # None for a target-only (autoregressive or prompt-lookup) setup
    tokenizer: Any
    target_name: str
    draft_name: str | None
    backend: Backend = TORCH
    backend_reason: str = ""  # why this backend was chosen (--backend auto)

    def _model(self, role: str) -> Any:
        model = self.target if role == "target" else self.draft
        if model is None:
            raise UserInputError("this operation needs a draft model")
        return model

    def runner(self, role: str = "target", longest_feed: int | None = None) -> ModelRunner:
        """A fresh runner (empty KV cache) over the target or the draft (`Backend.runner`)."""
        return self.backend.runner(self._model(role), self.vocab_size, longest_feed)

    def batch(self, role: str = "target") -> Any:
        """A batched decoder over the target or the draft (backends that `can_batch`)."""
        return self.backend.batch(self._model(role), self.vocab_size)

    def facts(self, role: str = "target") -> ModelFacts:
        return self.backend.facts(self._model(role))

    @property
    def vocab_size(self) -> int:
        """Logits are compared over the rows both models have (equal for same-family pairs)."""
        return min(self.backend.facts(m).vocab_rows for m in (self.target, self.draft) if m is not None)

    @property
    def device(self) -> torch.device:
        """Where the models (and so their probabilities, heads and sampling generators) live."""
        return self.facts().device

    @property
    def context_window(self) -> int:
        return self.facts().context_window

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(self.facts().eos_token_ids)
        source = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(source, int):
            ids.add(source)
        return ids

    def signature(self) -> PairSignature:
        if self.draft is None:
            raise UserInputError("this operation needs a draft model")
        return PairSignature(
            target=self.target_name,
            draft=self.draft_name or "",
            target_hidden_size=self.facts("target").hidden_size,
            draft_hidden_size=self.facts("draft").hidden_size,
            vocab_size=self.vocab_size,
        )


def check_vocabularies(target_tokenizer: Any, draft_tokenizer: Any, target_name: str, draft_name: str) -> None:
    """Refuse a pair whose tokenizers map tokens to ids differently."""
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if target_vocab == draft_vocab:
        return
    differing = sorted(
        set(target_vocab.items()) ^ set(draft_vocab.items()), key=lambda item: item[1]
    )
    shown = ", ".join(f"{tok!r}->{idx}" for tok, idx in differing[:5])
    raise PairMismatchError(
        f"the draft {draft_name!r} and target {target_name!r} have different vocabularies "
        f"({len(target_vocab)} vs {len(draft_vocab)} tokens, {len(differing)} (token, id) pairs differ, e.g. {shown}); "
        "speculative decoding needs the draft's vocabulary to match the target's"
    )


def pair_specs(target: str | None, draft: str | None, with_draft: bool = True) -> tuple[str, str | None]:
    """The model specs a pair loads: the embedded pair's for those not given, no draft without `with_draft`."""
    return target or DEFAULT_TARGET.name, (draft or DEFAULT_DRAFT.name) if with_draft else None


def load_pair(
    target: str | None = None,
    draft: str | None = None,
    dtype: str = DEFAULT_DTYPE,
    with_draft: bool = True,
    device: str = "cpu",
    backend: str | Backend = TORCH,
    reason: str = "",
) -> ModelPair:
    """Load a pair onto one device through one backend (an object or its registered name);
    both models default to the embedded Qwen2.5-Coder pair. `dtype` is the torch weights'
    dtype; a GGUF backend runs the file's own quantization.

    For `--backend auto`, settle the backend first: `calibration.choose_backend`.
    """
    chosen = get_backend(backend)
    target, draft = pair_specs(target, draft, with_draft)
    problem = chosen.unavailable(target, draft, resolve_device(device))  # fail before the (slow) load
    if problem is not None:
        raise UserInputError(problem)
    reason = reason or f"--backend {chosen.name}"
    target_model, tokenizer, target_name = chosen.load(target, dtype, device)
    chosen, reason = chosen.settle(target_model, target_name, reason)
    if draft is None:
        return ModelPair(target_model, None, tokenizer, target_name, None, chosen, reason)
    draft_model, draft_tokenizer, draft_name = chosen.load_draft(draft, target, dtype, device)
    chosen, reason = chosen.settle(draft_model, draft_name, reason)
    if draft_tokenizer is not None:  # None: the backend found the draft's vocabulary files equal to the target's
        check_vocabularies(tokenizer, draft_tokenizer, target_name, draft_name)
    return ModelPair(target_model, draft_model, tokenizer, target_name, draft_name, chosen, reason)
