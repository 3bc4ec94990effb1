"""How transformers' decoder runs our decoding steps on a CPU: three changes, none touching the math.

1. **Grouped-query attention for one new token, packed.** With no padding mask, transformers'
   SDPA path asks torch for `enable_gqa=True`, whose CPU kernel runs far below the matrix
   units' speed in bfloat16 at a batch of decoding rows. Packing the query heads that share a
   key/value head into the query-length axis ([B, heads, 1, D] -> [B, kv_heads, group, D]) is
   the same attention (transformers does it already whenever a mask is present) and runs on
   the fast kernel. `PACKED_SDPA` is that attention, registered with transformers under its
   own name and the SDPA mask; anything else (a longer query, no grouping, a compiled graph)
   goes to transformers' own SDPA unchanged.
2. **A KV cache that grows in place.** transformers' `DynamicLayer` concatenates each new
   token's keys and values onto the whole cache, copying every cached position of every row at
   every step. `GrowingLayer` keeps them in buffers with room to spare and writes a step in
   place; only a row change (rows leaving, being copied or joining) copies.
3. **Weights packed once.** torch's `linear` hands oneDNN the weight in its plain layout at
   every call. `PackedLinear` hands it the weight already in the blocked layout its kernels
   work in (the reorder torch's own compiler applies to frozen CPU graphs), done once at
   loading. Where it pays is measured per process (`packing_pays`), since it
   depends on the CPU and the dtype.

docs/performance.md ("Lockstep batches") has the measurements behind all three.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any, Iterator

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import pack_gqa, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.utils.import_utils import is_torchdynamo_compiling

PACKED_SDPA = "diversed_packed_sdpa"

# The matrix product that dominates a batched decoding step: 64 rows through a 1.5B decoder's MLP.
BATCH_PROBE_SHAPE = (64, 1536, 8960)


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with the query heads of a single new token packed per key/value head."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, query_length, head_dim = query.shape  # [B, heads, q, D]; key, value: [B, kv_heads, L, D]
    plain = groups == 1 or query_length != 1 or dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
    if plain or is_torchdynamo_compiling():
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    packed = pack_gqa(query, groups)  # [B, kv_heads, group, D]
    mask = pack_gqa(attention_mask, groups)  # [B, 1 or kv_heads, 1 or group, L]
    out = torch.nn.functional.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)  # [B, kv_heads, group, D]
    return out.reshape(batch, 1, heads, value.shape[-1]), None  # [B, q = 1, heads, D], as transformers returns it


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)


class _GrowingStates:
    """One [B, heads, T, D] tensor kept in a buffer with room for more positions along T."""

    def __init__(self, states: torch.Tensor):
        length = states.shape[-2]
        room = length + max(64, length // 4)  # amortizes the copy on overflow
        self.buffer = states.new_empty(*states.shape[:-2], room, states.shape[-1])
        self.buffer[..., :length, :] = states
        self.length = length

    def view(self) -> torch.Tensor:
        return self.buffer[..., : self.length, :]

    def select(self, rows: torch.Tensor) -> "_GrowingStates":
        """The rows `rows` [B'] of these states (repeats allowed), room included: one copy."""
        chosen = object.__new__(_GrowingStates)
        chosen.buffer, chosen.length = self.buffer.index_select(0, rows), self.length
        return chosen

    def append(self, states: torch.Tensor) -> "_GrowingStates":
        """These states with `states` [B, heads, t, D] after them: in place, or a new buffer when full."""
        end = self.length + states.shape[-2]
        if end > self.buffer.shape[-2] or states.shape[:-2] != self.buffer.shape[:-2]:
            return _GrowingStates(torch.cat([self.view(), states], dim=-2))
        self.buffer[..., self.length : end, :] = states
        self.length = end
        return self


class _GrowingAttribute:
    """A layer's `keys` or `values`: reads a view of its growing buffer; assigning copies into a new one."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        if layer is None:
            return self
        states = getattr(layer, self.slot, None)
        return None if states is None else states.view()

    def __set__(self, layer: Any, states: torch.Tensor | None) -> None:
        setattr(layer, self.slot, None if states is None or states.dim() != 4 else _GrowingStates(states))


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys` and `values` are views of growing buffers (see the module docstring).

    Assigning `keys` or `values` (as row selection, cropping or our batch's joins do) copies the
    tensor into a fresh buffer; `update` appends in place.
    """

    def __init__(self, **kwargs: Any):
        self._keys: _GrowingStates | None = None
        self._values: _GrowingStates | None = None
        super().__init__(**kwargs)

    keys = _GrowingAttribute()
    values = _GrowingAttribute()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return 0 if self._keys is None else self._keys.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._keys is not None and self._values is not None:
            self._keys, self._values = self._keys.select(indices), self._values.select(indices)

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` positions (transformers' convention); the room stays."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes the negative number of positions to remove, not {tokens_to_remove}")
        for states in (self._keys, self._values):
            if states is not None:
                states.length = max(0, states.length + tokens_to_remove)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._keys is None or self._values is None:
            self._keys, self._values = _GrowingStates(key_states), _GrowingStates(value_states)
        else:
            self._keys, self._values = self._keys.append(key_states), self._values.append(value_states)
        return self._keys.view(), self._values.view()


def growing_cache(config: Any) -> DynamicCache:
    """A `DynamicCache` for `config` whose full-attention layers grow in place (sliding-window layers stay as they are)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@contextlib.contextmanager
def transformers_kernels(*models: Any) -> Iterator[None]:
    """`models` on transformers' own SDPA dispatch, and new caches concatenating, for the time of the
    block: the baseline these kernels are tested (tests/test_torch_decode.py) and timed against."""
    global growing_cache
    own_cache, implementations = growing_cache, [model.config._attn_implementation for model in models]
    for model in models:
        model.set_attn_implementation("sdpa")
    growing_cache = lambda config: DynamicCache(config=config)  # noqa: E731
    try:
        yield
    finally:
        growing_cache = own_cache
        for model, implementation in zip(models, implementations):
            model.set_attn_implementation(implementation)


class PackedLinear(torch.nn.Module):
    """An `nn.Linear` (inference only) whose weight oneDNN has reordered once into its blocked layout.

    The product is the same kernel's on the same numbers, so outputs match the plain layer's;
    the weight is no longer an `nn.Parameter` (no gradients, no moving between devices).
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        rows_hint = BATCH_PROBE_SHAPE[0]  # oneDNN picks its blocking for about this many rows; any count works
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)  # [out, in], opaque layout
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return torch.ops.mkldnn._linear_pointwise(inputs, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def _packable() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")


@functools.cache
def packing_pays(dtype: torch.dtype) -> bool:
    """Whether packed weights multiply `BATCH_PROBE_SHAPE` in `dtype` faster than torch's own
    linear on this CPU, with the same result. Timed once per process, the two interleaved so
    that other load slows both alike; any failure of the packed path means no."""
    if dtype not in (torch.float32, torch.bfloat16) or not _packable():
        return False
    rows, width, height = BATCH_PROBE_SHAPE
    plain = torch.nn.Linear(width, height, bias=False, dtype=dtype).requires_grad_(False)
    inputs = torch.randn(rows, width).to(dtype)
    try:
        packed = PackedLinear(plain)
        with torch.inference_mode():
            if not torch.allclose(plain(inputs).float(), packed(inputs).float(), rtol=1e-2, atol=1e-3):
                return False
            seconds = {plain: [], packed: []}
            for _ in range(3):
                for layer, times in seconds.items():
                    started = time.perf_counter()
                    layer(inputs)
                    times.append(time.perf_counter() - started)
    except RuntimeError:
        return False
    return min(seconds[packed]) < min(seconds[plain])


_packing_on = True


@contextlib.contextmanager
def plain_weights() -> Iterator[None]:
    """Models loaded inside the block keep torch's plain linear layers: the baseline packing is timed against."""
    global _packing_on
    _packing_on = False
    try:
        yield
    finally:
        _packing_on = True


def fastest_linear(linear: torch.nn.Linear) -> torch.nn.Module:
    """`linear` packed where that pays on this CPU for its dtype, else `linear` itself."""
    weight = linear.weight
    return PackedLinear(linear) if _packing_on and weight.device.type == "cpu" and packing_pays(weight.dtype) else linear


def pack_linears(model: torch.nn.Module) -> int:
    """Every `nn.Linear` of `model` (LM head included) as `fastest_linear` makes it; -> how many were packed."""
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children() if type(child) is torch.nn.Linear]
    packed = 0
    for parent, name, child in linears:
        fastest = fastest_linear(child)
        if fastest is not child:
            setattr(parent, name, fastest)
            packed += 1
    return packed
