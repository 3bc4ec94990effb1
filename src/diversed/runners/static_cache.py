"""The graph-friendly torch runner: a static KV cache, fixed shapes, no host syncs.

gpt-fast's recipe for a transformers causal LM:

- The KV cache is preallocated (context + the largest padded block) and written at explicit
  positions, so rolling back is setting a length: stale entries beyond it are masked by
  causality and overwritten by the next tokens.
- Every feed of up to `max_block` tokens is padded to one of a few block sizes (1 for a step,
  2 for the draft catching up after a full acceptance, `max_block` = N_max + 1 for a verify),
  so `torch.compile(mode="reduce-overhead")` captures one CUDA graph per size and replays it.
  Padding tokens sit after the real ones: causality hides them from every real query, and
  the next feed overwrites what they wrote.
- Positions, the attention mask and the outputs are built on the device from host integers
  the runner already knows, so nothing here waits for the GPU.

Longer feeds (a prompt) run the same code eagerly at their exact length. On a CPU everything
runs eagerly: CUDA graphs are what makes the compiled path pay.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any, ClassVar, Sequence

import torch

from ..errors import UserInputError
from .base import Backend, token_tensor
from .hf import TORCH, TorchBackend

DEFAULT_CONTEXT = 4096  # tokens a static cache holds (prompt + generation), as llama.cpp's contexts
DEFAULT_MAX_BLOCK = 9  # N_max + 1 for the default N_max = 8, when the caller does not say
SUPPORTED_ATTENTION = ("sdpa", "diversed_packed_sdpa", "eager")  # the second: torch_decode.PACKED_SDPA


def unsupported_reason(model: Any) -> str | None:
    """Why the static runner cannot run `model` (None when it can)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "base_model"):
        return "not a transformers causal LM"
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        return f"its layers are not all full attention ({', '.join(sorted(layer_types))})"
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in SUPPORTED_ATTENTION:
        return f"attention implementation {implementation!r} does not take an explicit mask"
    return None


class StaticKV:
    """Per-layer keys and values [1, kv_heads, capacity, head_dim], written where told.

    transformers' attention layers call `update` with the new keys and values; they land at
    `write_positions` (set by the runner for each forward) and the whole buffer is returned,
    the mask hiding what is not (yet) context.
    """

    is_compileable = True

    def __init__(self, config: Any, capacity: int, dtype: torch.dtype, device: torch.device):
        heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (1, heads, capacity, head_dim)
        self.capacity = capacity
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        for tensor in self.keys + self.values:
            # A fixed address: captured graphs write into these very buffers.
            torch._dynamo.mark_static_address(tensor)
        self.write_positions: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.write_positions, key_states)
        values.index_copy_(2, self.write_positions, value_states)
        return keys, values


class GraphedModel:
    """One transformers causal LM, its forward (compiled on CUDA) and a pool of static caches.

    Caches are pooled because a captured graph is tied to the buffers it writes: reusing a
    few caches keeps the number of captured graphs small however many runners come and go.
    """

    def __init__(self, model: Any, vocab_size: int, context: int = DEFAULT_CONTEXT, compile_mode: str = "auto"):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the static-cache runner cannot run this model: {reason}")
        # No reference to `model` itself: the registry below holds this object weakly keyed by it.
        self.config = model.config
        self.body = model.base_model  # the decoder stack without the LM head
        self.lm_head = model.get_output_embeddings()
        self.vocab_size = vocab_size
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.hidden_size = int(model.config.hidden_size)
        window = int(getattr(model.config, "max_position_embeddings", context))
        self.context = min(context, window)
        self.eager_mask = model.config._attn_implementation == "eager"
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile_mode!r}; choose one of {', '.join(COMPILE_MODES)}")
        if compile_mode == "auto":
            compile_mode = "reduce-overhead" if self.device.type == "cuda" else "none"
        self.compile_mode = compile_mode
        self._blocks = _compiled(self._forward_block, compile_mode)
        self._pool: list[StaticKV] = []
        self._lock = threading.Lock()

    # -- caches -------------------------------------------------------------------------------
    def borrow(self, max_block: int) -> StaticKV:
        capacity = self.context + max_block
        with self._lock:
            for i, kv in enumerate(self._pool):
                if kv.capacity == capacity:
                    return self._pool.pop(i)
        with torch.no_grad():
            return StaticKV(self.config, capacity, self.dtype, self.device)

    def give_back(self, kv: StaticKV) -> None:
        with self._lock:
            self._pool.append(kv)

    # -- forwards -----------------------------------------------------------------------------
    def _hidden(self, ids: torch.Tensor, positions: torch.Tensor, kv: StaticKV) -> torch.Tensor:
        """ids, positions: [T] -> last-layer hidden states [T, H]; keys and values land at `positions`."""
        slots = torch.arange(kv.capacity, device=positions.device)  # [C]
        visible = slots.unsqueeze(0) <= positions.unsqueeze(1)  # [T, C]: causal over absolute positions
        mask = visible[None, None]  # [1, 1, T, C]
        if self.eager_mask:  # eager attention adds its mask
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill(~mask, torch.finfo(self.dtype).min)
        kv.write_positions = positions
        out = self.body(input_ids=ids.unsqueeze(0), attention_mask={"full_attention": mask},
                        position_ids=positions.unsqueeze(0), cache=kv, use_cache=True)
        return out.last_hidden_state[0]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)[:, : self.vocab_size].float()

    def _forward_block(self, ids: torch.Tensor, positions: torch.Tensor, kv: StaticKV) -> tuple[torch.Tensor, torch.Tensor]:
        """A padded block, every position's outputs: the function captured once per block size."""
        hidden = self._hidden(ids, positions, kv)
        return self._logits(hidden), hidden

    def forward_block(self, ids: torch.Tensor, positions: torch.Tensor, kv: StaticKV) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if self.compile_mode in ("reduce-overhead", "cudagraphs"):
                torch.compiler.cudagraph_mark_step_begin()  # earlier outputs were copied out: replay freely
            return self._blocks(ids, positions, kv)

    def forward_long(self, ids: torch.Tensor, positions: torch.Tensor, kv: StaticKV, num_logits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """An unpadded feed (a prompt), eagerly; the LM head only where logits are wanted."""
        with torch.no_grad():
            hidden = self._hidden(ids, positions, kv)[ids.shape[0] - num_logits :]
            return self._logits(hidden), hidden


COMPILE_MODES = ("auto", "none", "reduce-overhead", "cudagraphs", "trace")


def _compiled(forward: Any, mode: str) -> Any:
    """`forward` as run: eager ("none"); inductor with CUDA graphs ("reduce-overhead", gpt-fast's
    choice); CUDA graphs of the unfused kernels ("cudagraphs": no code generation, so capture
    takes seconds, not minutes); or traced by dynamo alone ("trace": the CPU tests' proof that
    the block forward is one graph)."""
    if mode == "none":
        return forward
    # Every model's block forward is one code object to dynamo, and each (model, block size)
    # is an entry of its cache: a draft and a target, each with three blocks, pass the default limit.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if mode == "trace":
        return torch.compile(forward, backend="eager", fullgraph=True, dynamic=False)
    if mode == "cudagraphs":
        return torch.compile(forward, backend="cudagraphs", fullgraph=True, dynamic=False)
    return torch.compile(forward, mode=mode, fullgraph=True, dynamic=False)


_graphed: "weakref.WeakKeyDictionary[Any, GraphedModel]" = weakref.WeakKeyDictionary()
_graphed_lock = threading.Lock()


def graphed_model(model: Any, vocab_size: int, compile_mode: str = "auto") -> GraphedModel:
    """The one GraphedModel of `model` (its compiled graphs and caches are shared by its runners);
    `compile_mode` applies when it is made (the first call for a model)."""
    with _graphed_lock:
        graphed = _graphed.get(model)
        if graphed is None or graphed.vocab_size != vocab_size:
            graphed = _graphed[model] = GraphedModel(model, vocab_size, compile_mode=compile_mode)
        return graphed


class StaticCacheRunner:
    """A ModelRunner over a GraphedModel: one borrowed static cache and the length it holds."""

    def __init__(self, graphed: GraphedModel, max_block: int = DEFAULT_MAX_BLOCK):
        self.graphed = graphed
        self.device = graphed.device
        self.max_block = max(2, max_block)
        self.block_sizes = tuple(sorted({1, 2, self.max_block}))
        self.kv = graphed.borrow(self.max_block)
        weakref.finalize(self, graphed.give_back, self.kv)
        self._length = 0

    @classmethod
    def for_model(cls, model: Any, vocab_size: int, max_block: int = DEFAULT_MAX_BLOCK) -> "StaticCacheRunner":
        return cls(graphed_model(model, vocab_size), max_block)

    @property
    def length(self) -> int:
        return self._length

    @property
    def context(self) -> int:
        return self.graphed.context

    def feed(self, tokens: Sequence[int] | torch.Tensor, num_logits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> logits [num_logits, V] float32, hidden [num_logits, H]: copies, safe past the next feed."""
        ids = token_tensor(tokens, self.device)  # [T]
        count = ids.shape[0]
        if count == 0:
            return torch.zeros(0, self.graphed.vocab_size, device=self.device), torch.zeros(0, self.graphed.hidden_size, device=self.device)
        if self._length + count > self.context:
            raise UserInputError(f"the static KV cache holds {self.context} tokens; this generation needs more")
        block = next((size for size in self.block_sizes if size >= count), None)
        if block is None:
            positions = torch.arange(self._length, self._length + count, device=self.device)  # [T]
            logits, hidden = self.graphed.forward_long(ids, positions, self.kv, num_logits)
        else:
            padded = torch.cat([ids, ids.new_zeros(block - count)]) if block > count else ids  # [B]
            positions = torch.arange(self._length, self._length + block, device=self.device)  # [B]
            logits, hidden = self.graphed.forward_block(padded, positions, self.kv)
            logits, hidden = logits[count - num_logits : count], hidden[count - num_logits : count]
        self._length += count
        # Copies: a replayed graph overwrites its outputs, and callers may keep these.
        return logits.clone(), hidden.clone()

    def rollback(self, length: int) -> None:
        self._length = min(self._length, length)


class StaticCacheBackend(TorchBackend):
    """transformers models run by `StaticCacheRunner`: a static KV cache, CUDA graphs on a GPU.

    `--backend auto` offers it on CUDA only (where graphs pay, and only when triton can compile
    them); a model it cannot run falls back to the eager torch runner under `auto`, saying why.
    """

    name: ClassVar[str] = "torch-static"
    can_batch: ClassVar[bool] = True  # batches run on the eager `TorchBatch` (lockstep evaluation and training on any device)

    def offered_by_auto(self, device):
        if device.type != "cuda":
            return False
        try:
            import triton  # noqa: F401  (inductor's CUDA code generator: no triton, no compiled graphs)
        except ImportError:
            return False
        return True

    def settle(self, model, name, reason):
        why = unsupported_reason(model)
        if why is None:
            return self, reason
        if not reason.startswith("auto"):
            raise UserInputError(f"--backend {self.name} cannot run {name}: {why}; use --backend torch")
        return TORCH, f"auto: torch, eager (the static-cache runner cannot run {name}: {why})"

    def facts(self, model):
        facts = super().facts(model)
        return dataclasses.replace(facts, context_window=min(facts.context_window, DEFAULT_CONTEXT))  # preallocated

    def runner(self, model, vocab_size, longest_feed=None):
        # One captured block fits a verify exactly: a smaller one sends longer drafts eagerly,
        # a larger one pads every verify.
        return StaticCacheRunner.for_model(model, vocab_size, longest_feed or DEFAULT_MAX_BLOCK)


TORCH_STATIC = StaticCacheBackend()
