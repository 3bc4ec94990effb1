"""The torch backend: Hugging Face causal LMs, their DynamicCache, and batched decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from ..embedded import EMBEDDED, convert_embedded, load_gguf_tokenizer
from ..errors import ModelLoadError, UserInputError, first_line
from .base import Backend, ModelFacts, token_tensor

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_DTYPE = "bfloat16"


class TorchRunner:
    """A transformers causal LM, its KV cache and how many tokens that cache holds."""

    def __init__(self, model: Any, vocab_size: int):
        from .torch_decode import growing_cache

        self.model = model
        self.vocab_size = vocab_size
        self.cache = growing_cache(model.config)
        self.body = model.base_model  # the decoder stack without the LM head
        self.lm_head = model.get_output_embeddings()
        self.device = next(model.parameters()).device

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def feed(self, tokens: Sequence[int] | torch.Tensor, num_logits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> logits [num_logits, V] (float32), hidden [num_logits, H]."""
        ids = token_tensor(tokens, self.device).reshape(1, -1)  # [1, T]
        before = self.length
        hidden = self.body(input_ids=ids, cache=self.cache, use_cache=True).last_hidden_state[0]  # [T, H]
        if self.length != before + ids.shape[1]:
            # A transformers version that does not take `cache=` drops it silently and every
            # step then runs without its context: refuse rather than decode wrongly.
            from transformers import __version__

            raise ModelLoadError(f"transformers {__version__} did not use the KV cache; diversed needs the pinned transformers (pyproject.toml)")
        if num_logits == 0:
            return hidden.new_zeros(0, self.vocab_size).float(), hidden[:0]
        last = hidden[-num_logits:]  # [num_logits, H]
        return self.lm_head(last)[:, : self.vocab_size].float(), last

    def rollback(self, length: int) -> None:
        extra = self.length - length
        if extra > 0:
            self.cache.crop(-extra)


class TorchBatch:
    """A causal LM decoding a left-padded batch with one KV cache; rows can leave, be copied or join.

    Batched decoding for training rollouts and lockstep evaluation (torch only).
    """

    def __init__(self, model: Any, vocab_size: int):
        from .torch_decode import growing_cache

        self.body = model.base_model  # the decoder stack without the LM head
        self.lm_head = model.get_output_embeddings()
        self.cache = growing_cache(model.config)
        self.vocab_size = vocab_size

    def feed(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, positions: [A, L] appended to the cache; mask: [A, cached + L] (0 = padding).

        -> logits [A, V] (float32) and last-layer hidden states [A, H] at each row's last position.
        """
        out = self.body(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache, use_cache=True)
        last = out.last_hidden_state[:, -1]  # [A, H]
        return self.lm_head(last)[:, : self.vocab_size].float(), last

    def keep(self, rows: torch.Tensor) -> None:
        """Keep the cached rows `rows` [A'], in that order (an index may repeat: the row is copied)."""
        self.cache.batch_select_indices(rows)

    def repeat(self, repeats: int) -> None:
        """Copy every cached row `repeats` times, copies next to each other: [A] -> [A * repeats]."""
        self.cache.batch_repeat_interleave(repeats)

    def absorb(self, other: "TorchBatch") -> None:
        """Append `other`'s cached rows after these: [A] + [B] -> [A + B]. The shorter cache is
        left-padded with zeros to the longer one's length; the caller's mask hides them (0)."""
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            length = max(mine.keys.shape[-2], theirs.keys.shape[-2])
            mine.keys = torch.cat([_left_pad_positions(mine.keys, length), _left_pad_positions(theirs.keys, length)])
            mine.values = torch.cat([_left_pad_positions(mine.values, length), _left_pad_positions(theirs.values, length)])

    def drop_front(self, positions: int) -> None:
        """Forget the first `positions` cached positions of every row (padding no row attends to)."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., positions:, :], layer.values[..., positions:, :]


def _left_pad_positions(states: torch.Tensor, length: int) -> torch.Tensor:
    """[B, heads, T, D] -> [B, heads, length, D], zeros in front."""
    return torch.nn.functional.pad(states, (0, 0, length - states.shape[-2], 0))


def resolve_device(device: str) -> torch.device:
    """A torch device the models can run on: "cpu", "cuda", "cuda:1", "mps"; a clear error otherwise."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserInputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__})")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserInputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"--device {device}: MPS is not available on this machine")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise UserInputError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return resolved


def load_model(spec: str, dtype: str = DEFAULT_DTYPE, device: str = "cpu"):
    """(model, tokenizer, name) from an embedded model name, a local dir, a .gguf file or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .torch_decode import PACKED_SDPA, pack_linears

    hf_logging.disable_progress_bar()  # loading a cached model takes seconds; no bar needed
    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    target_device = resolve_device(device)
    kwargs: dict[str, Any] = {}
    if spec in EMBEDDED:
        location, name = str(convert_embedded(EMBEDDED[spec])), spec
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        location, name, kwargs = str(path.parent), path.stem, {"gguf_file": path.name}
    else:
        location, name = spec, Path(spec).name if Path(spec).is_dir() else spec
    try:
        tokenizer = load_gguf_tokenizer(Path(spec)) if spec.endswith(".gguf") else AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {spec!r}: {first_line(exc)}") from None
    model.to(target_device).eval().requires_grad_(False)
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(PACKED_SDPA)  # the same attention, on the fast kernel for one new token
    pack_linears(model)  # the same products; weights reordered once instead of at every call (where that pays)
    return model, tokenizer, name


class TorchBackend(Backend):
    """transformers models in a torch dtype on any torch device; the one backend that batches."""

    name: ClassVar[str] = "torch"
    can_batch: ClassVar[bool] = True

    def unavailable(self, target, draft, device):
        return None  # every model spec loads through transformers

    def load(self, spec, dtype, device):
        return load_model(spec, dtype, device)

    def facts(self, model):
        eos: set[int] = set()
        for source in (model.generation_config.eos_token_id, model.config.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(source)
        weights = next(model.parameters())
        return ModelFacts(
            model.get_output_embeddings().out_features,
            int(model.config.hidden_size),
            int(getattr(model.config, "max_position_embeddings", 1 << 30)),
            frozenset(eos),
            weights.device,
            str(weights.dtype).removeprefix("torch."),
        )

    def runner(self, model, vocab_size, longest_feed=None):
        return TorchRunner(model, vocab_size)

    def batch(self, model, vocab_size):
        return TorchBatch(model, vocab_size)

    def version(self):
        return f"torch {torch.__version__}"

    def weights_label(self, dtype):
        return dtype


TORCH = TorchBackend()
