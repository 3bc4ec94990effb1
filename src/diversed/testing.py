"""Tiny real transformers for tests, demos and the server's quick checks.

`build_tiny_model(path, seed)` writes a randomly initialised Qwen2 causal LM with a
character-level tokenizer and a chat template into `path`, loadable by `load_pair` like any
local model directory. Two of them (different seeds, same tokenizer) make a draft/target pair
whose distributions differ in a controlled way; `perturb` makes a draft that is a noisy copy of
the model with the same seed, so the pair agrees often but not always. `sharpness` scales the LM head so next-token
distributions are peaked enough to be interesting (random init gives near-uniform ones).
"""

from __future__ import annotations

import string
from pathlib import Path

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
    max_positions: int = 512,
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
