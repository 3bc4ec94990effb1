"""Per-machine step costs: what one target step, one draft step and a k-token verification
cost on this machine, backend and pair, measured once and cached under $DIVERSED_HOME.

They drive two choices: `--backend auto` (the backend whose target step is faster) and
`--draft-length auto` (c and v(k), `draft_length.py`). The cache key names the machine (CPU
model and the flags that decide kernel speed, core count, or the accelerator), the backend and
its version, the dtype and the pair, so moving to another machine measures again.

A measurement taken while other work competed for the CPU is slower than the machine is, and
it would steer every later run. So each generation on a CPU checks the cached costs against
the target forwards the engine timed (`correct_costs`), and where the cache is clearly
slower, corrects it: load makes forwards slower, never faster, so only that direction is a
sign of a bad calibration rather than of a busy moment now.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .errors import UserInputError
from .draft_length import StepCosts, verify_costs_from_seconds
from .models import load_pair, pair_specs
from .paths import calibration_file
from .proposers import DRAFT_MODEL, ProposerKind
from .runners import AUTO, BACKENDS, Backend, get_backend
from .runners.hf import DEFAULT_DTYPE, DTYPES, resolve_device

SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "neon", "sve")
PROBE_PROMPT_TOKENS = 64
REPEATS = 5
DEFAULT_VERIFY_TOKENS = 9  # v(k) up to k = N_max + 1 for the default N_max = 8
# A cached forward this many times slower than the median the engine observed was measured
# under load (timing noise on a quiet machine stays far below it).
TOLERANCE = 1.5
MIN_SAMPLES = 3  # forwards of one size before their median is trusted


def cpu_description() -> tuple[str, list[str]]:
    """(CPU model name, the speed-relevant flags it has) from /proc/cpuinfo, or platform facts."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and name in ("", platform.processor(), platform.machine()):
                name = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    return name, [flag for flag in SPEED_FLAGS if flag in flags]


def machine_summary() -> str:
    """One line naming the CPU, its flags and cores: printed with every benchmark figure."""
    name, flags = cpu_description()
    return f"{name} ({os.cpu_count()} cores; {' '.join(flags) or 'no AVX2/AVX-512/AMX'})"


def _key(backend: Backend, dtype: str, device: str, target: str, draft: str | None) -> str:
    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        name, flags = cpu_description()
        where = f"{name}|{os.cpu_count()}|{','.join(flags)}|threads={torch.get_num_threads()}"
    return "|".join([where, backend.name, backend.version(), backend.weights_label(dtype), target, draft or "-"])


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(calibration_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    path = calibration_file()
    cache = _read_cache()
    cache[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")  # a server's threads may write too
    partial.write_text(json.dumps(cache, indent=1))
    partial.replace(path)  # atomic: a concurrent reader never sees half a file


@torch.inference_mode()
def measure_seconds(pair, max_tokens: int, repeats: int = REPEATS) -> dict[str, Any]:
    """Median seconds of: one target step, one draft step (if any), and k-token target
    forwards for k = 1..max_tokens, each after the same prefix, KV-cached, rolled back.

    The sizes are measured in interleaved sweeps, so a burst of load on a shared machine
    spoils one sample of each size rather than every sample of one; and since a longer
    forward never costs less, v(k) is then made non-decreasing (a noisy high v(k) is capped
    by the v(k + 1) measured after it).
    """
    prefix = [(7 * i + 11) % min(pair.vocab_size, 1000) for i in range(PROBE_PROMPT_TOKENS)]

    def once(runner, tokens: int) -> float:
        started = time.perf_counter()
        logits, _ = runner.feed(prefix[-tokens:], tokens)
        float(logits[-1, 0])  # wait for an accelerator to finish
        runner.rollback(len(prefix))
        return time.perf_counter() - started

    target = pair.runner("target", longest_feed=max_tokens)
    target.feed(prefix, 0)
    draft = pair.runner("draft") if pair.draft is not None else None
    if draft is not None:
        draft.feed(prefix, 0)
    # Warm-up: first-call allocations, and a static runner's graph captures, are not a step's cost.
    for k in range(1, max_tokens + 1):
        once(target, k)
    if draft is not None:
        once(draft, 1)
    samples: list[list[float]] = [[] for _ in range(max_tokens + 1)]  # per k, and the draft step last
    for _ in range(repeats):
        for k in range(1, max_tokens + 1):
            samples[k - 1].append(once(target, k))
        if draft is not None:
            samples[-1].append(once(draft, 1))
    verify = _non_decreasing([statistics.median(times) for times in samples[:-1]])
    draft_step = statistics.median(samples[-1]) if draft is not None else None
    return {"target_step": verify[0], "draft_step": draft_step, "verify": verify}


def _non_decreasing(verify: list[float]) -> list[float]:
    """A longer forward never costs less: cap each v(k) by v(k + 1)."""
    verify = list(verify)
    for k in range(len(verify) - 2, -1, -1):
        verify[k] = min(verify[k], verify[k + 1])
    return verify


def calibrated_seconds(pair, dtype: str, device: str, max_tokens: int) -> dict[str, Any]:
    """`measure_seconds` for this machine, backend and pair, from the cache when it is there."""
    key = _key(pair.backend, dtype, device, pair.target_name, pair.draft_name)
    entry = _read_cache().get(key)
    if entry is None or len(entry["verify"]) < max_tokens or (pair.draft is not None and entry["draft_step"] is None):
        print(f"calibrating step costs for this machine and the {pair.backend.name} backend (once)...", file=sys.stderr)
        entry = measure_seconds(pair, max_tokens)
        entry["machine"] = machine_summary()
        _write_cache(key, entry)
    return entry


def _pair_key(pair) -> str:
    return _key(pair.backend, pair.facts().weights, str(pair.device), pair.target_name, pair.draft_name)


def corrected_entry(entry: dict[str, Any], forwards: dict[int, list[float]]) -> dict[str, Any] | None:
    """The cached seconds corrected by observed forwards (`forwards[k]`: seconds of k-token
    target forwards), or None when they agree.

    They disagree when some size's observed median is TOLERANCE times faster than the cache.
    Then every observed size takes its median, and the sizes not observed, and the draft step,
    are scaled by the ratio at the most observed size (the whole calibration ran under the same
    load, so its ratios c and v(k) are kept where nothing better is known).
    """
    cached = entry["verify"]
    observed = {k: statistics.median(times) for k, times in forwards.items() if len(times) >= MIN_SAMPLES and 1 <= k <= len(cached)}
    if not any(seconds * TOLERANCE < cached[k - 1] for k, seconds in observed.items()):
        return None
    anchor = max(observed, key=lambda k: (len(forwards[k]), -k))
    scale = min(1.0, observed[anchor] / cached[anchor - 1])
    verify = _non_decreasing([observed.get(k, seconds * scale) for k, seconds in enumerate(cached, start=1)])
    draft_step = entry["draft_step"] * scale if entry["draft_step"] is not None else None
    return {**entry, "target_step": verify[0], "draft_step": draft_step, "verify": verify, "corrected": "from engine timings"}


def correct_costs(pair, forwards: dict[int, list[float]]) -> dict[str, Any] | None:
    """Check this pair's cached costs against the target forwards a generation timed
    (`engine.RoundClock.forwards`); correct and save them when the cache was measured under
    load. Returns the corrected entry, or None (no cached entry, or no disagreement).

    CPU only: on an accelerator a round waits for the device once, not after each forward
    (docs/performance.md), so the engine's per-forward times are not a forward's cost.
    """
    if pair.device.type != "cpu":
        return None
    key = _pair_key(pair)
    entry = _read_cache().get(key)
    corrected = corrected_entry(entry, forwards) if entry is not None else None
    if corrected is not None:
        try:
            _write_cache(key, corrected)
        except OSError:
            return None  # a read-only cache: the generation itself has succeeded, and the next run checks again
        print(f"note: corrected the cached step costs of the {pair.backend.name} backend on this machine: a target step "
              f"{entry['target_step'] * 1e3:.1f} ms when calibrated, {corrected['target_step'] * 1e3:.1f} ms in this run "
              "(the calibration ran under load)", file=sys.stderr)
    return corrected


def step_costs(pair, max_draft_length: int, proposer: ProposerKind = DRAFT_MODEL) -> StepCosts:
    """c and v(1..N_max+1) for `--draft-length auto`; the proposer prices a draft step (prompt lookup: c = 0)."""
    entry = calibrated_seconds(pair, pair.facts().weights, str(pair.device), max_draft_length + 1)
    draft_step = proposer.draft_seconds(entry["draft_step"])
    return verify_costs_from_seconds(entry["target_step"], draft_step, entry["verify"][: max_draft_length + 1])


def batched_dtype(device: str = "cpu") -> tuple[str, str]:
    """(torch dtype, why) whose matrix products run a batch of decoding rows fastest on this
    machine: bfloat16 where the CPU multiplies it natively, float32 where bfloat16 is emulated.
    Each dtype is timed on the kernel the models will use (`fastest_linear`: packed weights
    where that pays). Measured once per machine (the dtypes' products interleaved, so load hits
    both alike) and cached."""
    if resolve_device(device).type != "cpu":
        return DEFAULT_DTYPE, f"{DEFAULT_DTYPE}, the default off the CPU"
    # Imported here: the kernels need the engine's transformers, which vLLM's environment lacks.
    from .runners.torch_decode import BATCH_PROBE_SHAPE, fastest_linear

    name, flags = cpu_description()
    key = f"batched-dtype-2|{name}|{os.cpu_count()}|{','.join(flags)}|threads={torch.get_num_threads()}|torch {torch.__version__}"
    entry = _read_cache().get(key)
    if entry is None:
        rows, width, height = BATCH_PROBE_SHAPE
        operands = {
            dtype: (torch.randn(rows, width).to(DTYPES[dtype]), fastest_linear(torch.nn.Linear(width, height, bias=False, dtype=DTYPES[dtype])))
            for dtype in DTYPES
        }
        samples: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
        with torch.inference_mode():
            for sweep in range(REPEATS + 1):
                for dtype, (inputs, layer) in operands.items():
                    started = time.perf_counter()
                    layer(inputs)
                    if sweep:  # the first sweep sets the kernels up
                        samples[dtype].append(time.perf_counter() - started)
        seconds = {dtype: min(times) for dtype, times in samples.items()}
        best = min(seconds, key=seconds.get)
        entry = {"dtype": best, "gflops": {dtype: 2 * rows * width * height / s / 1e9 for dtype, s in seconds.items()}}
        _write_cache(key, entry)
    detail = ", ".join(f"{dtype} {gflops:.0f}" for dtype, gflops in entry["gflops"].items())
    return entry["dtype"], f"{entry['dtype']}, the faster batched matrix product here (measured GFLOP/s: {detail})"


def choose_backend(target: str | None, draft: str | None, dtype: str | None, device: str,
                   requested: str = AUTO) -> tuple[Backend, str]:
    """(backend, why) for `--backend REQUESTED`; the one place `auto` is settled.

    `auto` takes, among the backends that can run this pair here, the one whose measured
    target step is faster (measured once per machine and cached). An explicit `dtype` (None
    when the user named none) leaves out the backends whose weights it does not set (llama.cpp
    runs a GGUF's own quantization), so it is never silently ignored.
    """
    if requested != AUTO:
        backend = get_backend(requested)
        if dtype is not None and backend.weights_label(dtype) != dtype:
            raise UserInputError(f"--dtype {dtype} does not apply to the {backend.name} backend (it runs the model files' own "
                                 "weights); leave --dtype out")
        return backend, f"--backend {requested}"
    target, draft = pair_specs(target, draft, with_draft=draft is not None)
    where = resolve_device(device)
    usable, refused = [], []
    for backend in BACKENDS.values():
        if not backend.offered_by_auto(where):
            continue
        problem = backend.unavailable(target, draft, where)
        if problem is None and dtype is not None and backend.weights_label(dtype) != dtype:
            problem = f"--dtype {dtype} does not apply to the {backend.name} backend's weights"
        (usable if problem is None else refused).append((backend, problem))
    dtype = dtype or DEFAULT_DTYPE
    if not usable:
        raise UserInputError("no backend can run this pair here: " + "; ".join(str(problem) for _, problem in refused))
    if len(usable) == 1:
        why = "; ".join(str(problem).split(";")[0] for _, problem in refused)
        return usable[0][0], f"auto: {usable[0][0].name} ({why})"
    seconds = {}
    for backend, _ in usable:
        entry = _read_cache().get(_key(backend, dtype, device, target, draft))
        if entry is None:
            pair = load_pair(target, draft, dtype, with_draft=draft is not None, device=device, backend=backend)
            entry = calibrated_seconds(pair, dtype, device, DEFAULT_VERIFY_TOKENS)
            del pair
        seconds[backend] = entry["target_step"]
    best = min(seconds, key=seconds.get)
    detail = ", ".join(f"{b.name} {1 / s:.1f}" for b, s in seconds.items())
    return best, f"auto: {best.name} (measured target tokens/s on this machine: {detail})"
