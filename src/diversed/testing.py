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


# vLLM's CPU attention takes head sizes from 32 up; build_tiny_model's default (8) it refuses.
VLLM_HIDDEN_SIZE = 128  # 4 heads of 32


def build_tiny_vllm_pair(root: str | Path, *, alphabet: str = "abcdef") -> tuple[Path, Path]:
    """(target, draft) tiny models that vLLM loads: an 11-token vocabulary, a draft that differs clearly."""
    root = Path(root)
    kwargs = dict(alphabet=alphabet, hidden_size=VLLM_HIDDEN_SIZE, layers=1, sharpness=3.0)
    return build_tiny_model(root / "target", seed=3, **kwargs), build_tiny_model(root / "draft", seed=3, perturb=5.0, **kwargs)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def served(serve_args: list[str], log_path: Path, *, threads: int | None = None, health_timeout: float = 90.0,
           python: str = sys.executable) -> Iterator[str]:
    """Run `diversed serve SERVE_ARGS` as a real process on a free loopback port; yield its URL.

    Waits for /health, raises RuntimeError (with the server's log) if it dies or stays
    unhealthy, and stops the process on exit. `threads` sets OMP_NUM_THREADS for it; `python`
    is the interpreter of the environment it runs in (vLLM's, for `--engine vllm`).
    """
    import httpx

    port = free_port()
    command = [python, "-m", "diversed.cli", "serve", "--port", str(port), *serve_args]
    env = dict(os.environ) if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONFAULTHANDLER"] = "1"  # a native crash leaves every thread's stack in the log
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
        if process.poll() is not None:  # it died while serving: its log says why (pytest shows stderr on failure)
            print(f"the server had exited with {process.returncode}:\n{log_path.read_text(errors='replace')}", file=sys.stderr)
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Hugging Face Qwen2 tensor names -> llama.cpp's (GGUF) names.
_GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def build_tiny_gguf(model_dir: str | Path, out_path: str | Path) -> Path:
    """Write the tiny Qwen2 model in `model_dir` (see `build_tiny_model`) as an f32 GGUF file
    llama.cpp can run, with its tokenizer saved beside it (the llama.cpp backend reads a
    tokenizer saved next to a GGUF before the GGUF's own metadata)."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoTokenizer

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rope = getattr(config, "rope_parameters", None) or {}
    writer = gguf.GGUFWriter(str(out_path), "qwen2")
    writer.add_name(model_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    specials = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab] + [f"<extra_{i}>" for i in range(config.vocab_size - len(vocab))])
    token_types = [gguf.TokenType.CONTROL if token in specials else gguf.TokenType.NORMAL for token, _ in vocab]
    writer.add_token_types(token_types + [gguf.TokenType.UNUSED] * (config.vocab_size - len(vocab)))
    writer.add_token_merges(["a b"])  # llama.cpp requires BPE merges; texts are tokenized by the HF tokenizer
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    for name, tensor in load_file(str(model_dir / "model.safetensors")).items():
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            gguf_name = f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}"
        else:
            gguf_name = _GGUF_NAMES[name]
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tokenizer.save_pretrained(str(out_path.parent))
    return out_path
