"""Tiny real transformers for tests, demos and the server's quick checks.

`build_tiny_model(path, seed)` writes a randomly initialised Qwen2 causal LM with a
character-level tokenizer and a chat template into `path`, loadable by `load_pair` like any
local model directory. Two of them (different seeds, same tokenizer) make a draft/target pair
whose distributions differ in a controlled way; `perturb` makes a draft that is a noisy copy of
the model with the same seed, so the pair agrees often but not always. `sharpness` scales the LM head so next-token
distributions are peaked enough to be interesting (random init gives near-uniform ones).
"""

from __future__ import annotations

import os
import socket
import string
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{% else %}<|assistant|>{% endif %}"
    "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(alphabet: str | None = None):
    """A character-level fast tokenizer: one token per character, specials first."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = alphabet if alphabet is not None else string.ascii_letters + string.digits + " .,:;!?'\"()[]{}+-*/=<>_#\n"
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(alphabet)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(
    path: str | Path,
    seed: int,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 32,
    layers: int = 2,
    sharpness: float = 40.0,
    alphabet: str | None = None,
    max_positions: int = 2048,
    perturb: float = 0.0,
) -> Path:
    """Write a tiny Qwen2 model + tokenizer to `path` and return it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    tokenizer = build_char_tokenizer(alphabet)
    vocab = vocab_size or len(tokenizer)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        if perturb:
            # A draft-like sibling: same weights as `seed`, LM head nudged by seeded noise.
            noise = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(seed + 7919))
            model.lm_head.weight.add_(perturb * model.lm_head.weight.std() * noise)
        model.lm_head.weight.mul_(sharpness)
        # Make EOS rare so generations have a useful length.
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(serve_args: list[str], log_path: Path, *, threads: int | None = None, health_timeout: float = 90.0) -> Iterator[str]:
    """Run `diversed serve SERVE_ARGS` as a real process on a free loopback port; yield its URL.

    Waits for /health, raises RuntimeError (with the server's log) if it dies or stays
    unhealthy, and stops the process on exit. `threads` sets OMP_NUM_THREADS for it.
    """
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "diversed.cli", "serve", "--port", str(port), *serve_args]
    env = dict(os.environ) if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + health_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not healthy within {health_timeout:.0f} s:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
