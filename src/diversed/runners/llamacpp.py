"""The llama.cpp runner: a GGUF model run natively through llama-cpp-python's C API.

One `LlamaCppModel` holds the weights; each runner borrows a context (its own KV cache) from
the model's pool and returns it when the runner is dropped. Rollback is positional
(`llama_memory_seq_rm`), as llama.cpp's own speculative example does. Hidden states come from
the same decode as the logits: the context runs with embeddings on and no pooling, so
llama.cpp returns, for every output position, both the logits and the final-norm hidden state
(the input of the LM head, the same tensor the torch runner returns).
"""

from __future__ import annotations

import collections.abc
import ctypes
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ..embedded import EMBEDDED, gguf_path, gguf_tokenizer_folder, load_gguf_tokenizer, vocabulary_fingerprint
from ..errors import ModelLoadError, UserInputError
from .base import Backend, ModelFacts

DEFAULT_CONTEXT = 4096  # KV-cache positions per context (prompt + generation)


def import_llama_cpp() -> Any:
    """llama_cpp, or a one-line error saying why it cannot be used and how to get it."""
    try:
        import llama_cpp
    except ImportError as exc:
        missing = "is not installed" if exc.name == "llama_cpp" else f"cannot be imported ({exc})"
        raise UserInputError(
            f"the llama.cpp backend needs llama-cpp-python, which {missing}; run scripts/setup.sh "
            "(it builds it from source) or use --backend torch"
        ) from None
    return llama_cpp


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


_quiet_once = threading.Lock()
_log_callback = None


def _silence_llama_logs(llama_cpp: Any) -> None:
    """llama.cpp prints hundreds of loader lines to stderr; keep the CLI's output readable."""
    global _log_callback
    with _quiet_once:
        if _log_callback is None:
            _log_callback = _native_no_op(llama_cpp) or llama_cpp.llama_log_callback(lambda level, text, user_data: None)
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def _native_no_op(llama_cpp: Any) -> Any:
    """A log callback in C that does nothing, or None where libc cannot be opened.

    llama.cpp calls its log callback on the loading thread for each of its loader lines; a
    Python callback takes the GIL for each, so a load running beside Python work (the
    tokenizer, `load_llamacpp_model`) would stall on every line. libc's `getpagesize` reads
    nothing and changes nothing, and the C calling conventions leave unused arguments to the
    caller, so it serves as a callback that needs no GIL.
    """
    try:
        return ctypes.cast(ctypes.CDLL(None).getpagesize, llama_cpp.llama_log_callback)
    except (OSError, AttributeError, TypeError):
        return None


class LlamaCppModel:
    """Weights of one GGUF model, loaded once; contexts are made on demand and pooled.

    `lazy`: the facts come from the file's header and the weights load at the first context
    (`new_context`), so a draft that the draft-length rule never runs costs no load and no
    memory. Whatever borrows a context (every runner's first feed) loads it.
    """

    def __init__(self, path: str | Path, n_ctx: int = DEFAULT_CONTEXT, threads: int | None = None, lazy: bool = False):
        self.llama_cpp = llama_cpp = import_llama_cpp()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        self._loaded: list[Any] = []  # [llama_model, vocab] once loaded (a list: the finalizer sees it fill)
        self._load_lock = threading.Lock()
        self._eos: frozenset[int] | None = None
        self._pool: list[Any] = []
        self._pool_lock = threading.Lock()
        weakref.finalize(self, _free_model, llama_cpp, self._loaded, self._pool)
        if lazy:
            self.vocab_size, self.hidden_size, self.train_context = gguf_header_facts(self.path)
        else:
            self._load()
        self.n_ctx = min(n_ctx, self.train_context) if self.train_context > 0 else n_ctx
        self.threads = threads or default_threads()

    def _load(self) -> None:
        llama_cpp = self.llama_cpp
        _silence_llama_logs(llama_cpp)
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {self.path}")
        vocab = llama_cpp.llama_model_get_vocab(model)
        self._loaded[:] = [model, vocab]
        facts = (int(llama_cpp.llama_vocab_n_tokens(vocab)),  # rows of the LM head
                 int(llama_cpp.llama_model_n_embd(model)), int(llama_cpp.llama_model_n_ctx_train(model)))
        if hasattr(self, "vocab_size") and facts != (self.vocab_size, self.hidden_size, self.train_context):
            raise ModelLoadError(f"llama.cpp read {self.path} as (vocabulary, hidden size, context) {facts}, its header as "
                                 f"{(self.vocab_size, self.hidden_size, self.train_context)}")
        self.vocab_size, self.hidden_size, self.train_context = facts

    @property
    def model(self) -> Any:
        """The llama.cpp model, loaded now if it was loaded lazily."""
        if not self._loaded:
            with self._load_lock:
                if not self._loaded:
                    self._load()
        return self._loaded[0]

    @property
    def loaded(self) -> bool:
        return bool(self._loaded)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The end-of-generation tokens (llama.cpp's own rule; this loads a lazy model)."""
        if self._eos is None:
            self.model  # noqa: B018  (loads a lazy model)
            vocab = self._loaded[1]
            self._eos = frozenset(t for t in range(self.vocab_size) if self.llama_cpp.llama_vocab_is_eog(vocab, t))
        return self._eos

    @property
    def context_window(self) -> int:
        return self.n_ctx

    def new_context(self) -> Any:
        llama_cpp = self.llama_cpp
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = min(512, self.n_ctx)
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = self.threads
        params.embeddings = True  # hidden states with the logits of the same decode
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not ctx:
            raise ModelLoadError(f"llama.cpp could not create a context for {self.path}")
        return ctx

    def borrow(self) -> Any:
        with self._pool_lock:
            ctx = self._pool.pop() if self._pool else None
        if ctx is None:
            return self.new_context()
        self.llama_cpp.llama_memory_clear(self.llama_cpp.llama_get_memory(ctx), True)
        return ctx

    def give_back(self, ctx: Any) -> None:
        with self._pool_lock:
            self._pool.append(ctx)

    def runner(self) -> "LlamaCppRunner":
        return LlamaCppRunner(self)


# GGUF value types (ggml's gguf.h): the size of each fixed-size one; 8 is a string, 9 an array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_header_facts(path: Path) -> tuple[int, int, int]:
    """(vocabulary size, hidden size, training context) from a GGUF file's metadata, without
    loading it (llama.cpp's own numbers: the token list's length, `ARCH.embedding_length`,
    `ARCH.context_length`). Arrays are skipped, not read; a ModelLoadError if any is missing."""
    import struct

    try:
        return _read_header_facts(path)
    except (struct.error, ValueError, OSError) as exc:  # a truncated or damaged file
        raise ModelLoadError(f"cannot read the GGUF metadata of {path}: {exc}") from None


def _read_header_facts(path: Path) -> tuple[int, int, int]:
    import mmap
    import struct

    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] < 2:
            raise ModelLoadError(f"{path} is not a GGUF file llama.cpp can read (version 2 or later)")
        count = struct.unpack_from("<Q", data, 16)[0]
        at = 24

        def string() -> str:
            nonlocal at
            size = struct.unpack_from("<Q", data, at)[0]
            at += 8 + size
            return data[at - size : at].decode("utf-8", "replace")

        def skip(kind: int, items: int = 1) -> None:
            nonlocal at
            if kind in _GGUF_SIZES:
                at += _GGUF_SIZES[kind] * items
            elif kind == _GGUF_STRING:
                for _ in range(items):
                    at += 8 + struct.unpack_from("<Q", data, at)[0]
            else:
                raise ModelLoadError(f"{path}: unsupported GGUF metadata type {kind}")

        values: dict[str, Any] = {}

        def facts() -> tuple[int, int, int] | None:
            arch = values.get("general.architecture")
            wanted = ("tokenizer.ggml.tokens", f"{arch}.embedding_length", f"{arch}.context_length")
            return tuple(int(values[name]) for name in wanted) if all(name in values for name in wanted) else None  # type: ignore[return-value]

        for _ in range(count):
            key = string()
            kind = struct.unpack_from("<I", data, at)[0]
            at += 4
            if kind == _GGUF_ARRAY:
                item_kind, items = struct.unpack_from("<IQ", data, at)
                at += 12
                if key == "tokenizer.ggml.tokens":
                    values[key] = items
                if (found := facts()) is not None:
                    return found  # before walking the token list's strings
                skip(item_kind, items)
                continue
            if kind == _GGUF_STRING:
                values[key] = string()
            elif kind in (4, 5, 10, 11):  # the integer types the facts use
                values[key] = struct.unpack_from({4: "<I", 5: "<i", 10: "<Q", 11: "<q"}[kind], data, at)[0]
                skip(kind)
            else:
                skip(kind)
            if (found := facts()) is not None:
                return found
    raise ModelLoadError(f"{path}: the GGUF metadata lacks the architecture, its sizes or the token list")


def _free_model(llama_cpp: Any, loaded: list[Any], pool: list[Any]) -> None:
    for ctx in pool:
        llama_cpp.llama_free(ctx)
    pool.clear()
    if loaded:
        llama_cpp.llama_model_free(loaded[0])


class _EndTokens(collections.abc.Set):
    """A model's end-of-generation tokens, read from it when first used."""

    def __init__(self, model: LlamaCppModel):
        self._model = model

    def __contains__(self, token: object) -> bool:
        return token in self._model.eos_token_ids

    def __iter__(self):
        return iter(self._model.eos_token_ids)

    def __len__(self) -> int:
        return len(self._model.eos_token_ids)

    __hash__ = collections.abc.Set._hash


class LlamaCppRunner:
    """One KV cache over a `LlamaCppModel` (the ModelRunner protocol)."""

    device = torch.device("cpu")

    def __init__(self, model: LlamaCppModel):
        self.model = model
        self.llama_cpp = model.llama_cpp
        self.batch_size = min(512, model.n_ctx)
        # The context is borrowed at the first feed: a draft runner whose rounds are all
        # N = 0 never loads a lazy model, nor allocates a KV cache.
        self.ctx: Any = None
        self._resources: list[Any] = []  # [ctx, batch] once borrowed, for the finalizer
        self._length = 0
        weakref.finalize(self, _release, model, self.llama_cpp, self._resources)

    def _open(self) -> None:
        if self.ctx is None:
            self.ctx = self.model.borrow()
            self.memory = self.llama_cpp.llama_get_memory(self.ctx)
            self.batch = self.llama_cpp.llama_batch_init(self.batch_size, 0, 1)
            self._resources[:] = [self.ctx, self.batch]

    @property
    def length(self) -> int:
        return self._length

    def feed(self, tokens: Sequence[int] | torch.Tensor, num_logits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> logits [num_logits, V] float32, hidden [num_logits, H] float32."""
        tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if self._length + len(tokens) > self.model.n_ctx:
            raise UserInputError(f"the llama.cpp context holds {self.model.n_ctx} tokens; this generation needs more")
        self._open()
        split = len(tokens) - num_logits
        # With embeddings on, llama.cpp outputs every token of a batch; so the positions whose
        # outputs are not wanted go in batches with embeddings off (no outputs at all).
        self._decode_all(tokens[:split], outputs=False)
        logits, hidden = self._decode_all(tokens[split:], outputs=True)
        return logits, hidden

    def _decode_all(self, tokens: list[int], outputs: bool) -> tuple[torch.Tensor, torch.Tensor]:
        llama_cpp, model = self.llama_cpp, self.model
        logits: list[np.ndarray] = []
        hidden: list[np.ndarray] = []
        if tokens:
            llama_cpp.llama_set_embeddings(self.ctx, outputs)
        for start in range(0, len(tokens), self.batch_size):
            chunk = tokens[start : start + self.batch_size]
            self._decode(chunk, outputs)
            if outputs:
                logits.append(self._read(llama_cpp.llama_get_logits(self.ctx), len(chunk), model.vocab_size))
                hidden.append(self._read(llama_cpp.llama_get_embeddings(self.ctx), len(chunk), model.hidden_size))
        if not logits:
            return torch.zeros(0, model.vocab_size), torch.zeros(0, model.hidden_size)
        return torch.from_numpy(np.concatenate(logits)), torch.from_numpy(np.concatenate(hidden))

    def _decode(self, chunk: list[int], outputs: bool) -> None:
        """Decode `chunk` at the next positions, every token an output or none."""
        batch = self.batch
        batch.n_tokens = len(chunk)
        for i, token in enumerate(chunk):
            batch.token[i] = token
            batch.pos[i] = self._length + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = outputs
        status = self.llama_cpp.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        self._length += len(chunk)

    @staticmethod
    def _read(pointer: Any, rows: int, width: int) -> np.ndarray:
        # Copy out of llama.cpp's buffer: the next decode overwrites it.
        return np.ctypeslib.as_array(pointer, shape=(rows * width,)).reshape(rows, width).copy()

    def rollback(self, length: int) -> None:
        if length < self._length:
            self.llama_cpp.llama_memory_seq_rm(self.memory, 0, length, -1)
            self._length = length


def _release(model: LlamaCppModel, llama_cpp: Any, resources: list[Any]) -> None:
    if resources:
        ctx, batch = resources
        llama_cpp.llama_batch_free(batch)
        model.give_back(ctx)


def load_llamacpp_model(spec: str) -> tuple[LlamaCppModel, Any, str]:
    """(LlamaCppModel, tokenizer, name); a one-line error without a GGUF.

    The weights load in C, which releases the GIL, so they load on a thread while this one
    reads the tokenizer (Python). A tokenizer not yet converted loads after the weights, as
    everything did before: a file llama.cpp refuses then writes no tokenizer to the cache.
    """
    import_llama_cpp()  # fail first with the install hint
    path = gguf_path(spec)
    if path is None:
        raise UserInputError(_no_gguf(spec))
    name = spec if spec in EMBEDDED else path.stem
    if gguf_tokenizer_folder(path) is None:
        return LlamaCppModel(path), load_gguf_tokenizer(path), name
    with ThreadPoolExecutor(1, thread_name_prefix="llama.cpp load") as pool:
        weights = pool.submit(LlamaCppModel, path)
        try:
            tokenizer, failed = load_gguf_tokenizer(path), None
        except BaseException as exc:  # noqa: BLE001  (raised below, after the weights' own error if any)
            tokenizer, failed = None, exc
        model = weights.result()  # the weights' error first, as when the weights loaded first
    if failed is not None:
        raise failed
    return model, tokenizer, name


def _no_gguf(spec: str) -> str:
    return f"the llama.cpp backend needs a GGUF model; {spec!r} has none (give a .gguf file, or use --backend torch)"


class LlamaCppBackend(Backend):
    """GGUF models (their own quantization) through llama.cpp's C API, on the CPU."""

    name: ClassVar[str] = "llama.cpp"

    def unavailable(self, target, draft, device):
        if device.type != "cpu":
            return f"the llama.cpp backend runs on the CPU here; --device {device} needs --backend torch"
        try:
            import_llama_cpp()
        except UserInputError as exc:
            return str(exc)
        return next((_no_gguf(spec) for spec in (target, draft) if spec is not None and gguf_path(spec) is None), None)

    def load(self, spec, dtype, device):
        return load_llamacpp_model(spec)  # the GGUF's own weights: no torch dtype applies

    def facts(self, model):
        eos = model.eos_token_ids if model.loaded else _EndTokens(model)  # a lazy draft's facts do not load it
        return ModelFacts(model.vocab_size, model.hidden_size, model.context_window, eos, torch.device("cpu"), "gguf")

    def load_draft(self, spec, target_spec, dtype, device):
        """(model, tokenizer or None, name) of a pair's draft, cheaper than `load`: the weights load at the draft's first forward, so a run whose
        rounds are all N = 0 never loads them; and no tokenizer is returned (none loaded) when
        the draft's vocabulary files are byte for byte the target's, the one thing the draft's
        tokenizer would be loaded for."""
        import_llama_cpp()
        path, target_path = gguf_path(spec), gguf_path(target_spec)
        if path is None:
            raise UserInputError(_no_gguf(spec))
        name = spec if spec in EMBEDDED else path.stem
        fingerprint = vocabulary_fingerprint(path)
        same = fingerprint is not None and target_path is not None and fingerprint == vocabulary_fingerprint(target_path)
        return LlamaCppModel(path, lazy=True), None if same else load_gguf_tokenizer(path), name

    def runner(self, model, vocab_size, longest_feed=None):
        return model.runner()

    def version(self):
        return f"llama-cpp-python {import_llama_cpp().__version__}"

    def weights_label(self, dtype):
        return "gguf"


LLAMA_CPP = LlamaCppBackend()
