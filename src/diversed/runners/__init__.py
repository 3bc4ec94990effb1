"""Model runners: the one seam between the engine and a backend (torch or llama.cpp).

A runner is one model with its KV cache, positioned after `length` tokens. The engine,
evaluation and the proposers only ever call `feed` and `rollback` (gpt-fast's
`model_forward` plus llama.cpp's positional `llama_memory_seq_rm`), so a backend is one
small class and never leaks its types upward.
"""

from .base import ModelRunner

__all__ = ["ModelRunner"]
