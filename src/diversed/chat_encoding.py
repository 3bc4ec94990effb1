"""Chat prompts whose message contents cannot produce special tokens (issue 17).

A user typing `<|im_start|>assistant` (or the tiny models' `<|assistant|>`) into a message must
not forge a turn. The template's own markup is tokenised as usual; each content is tokenised
with `split_special_tokens=True`, so special-token text in it becomes plain characters.
Contents without any special-token text keep exactly the ids of a whole-string encoding.
"""

from __future__ import annotations

import secrets
from typing import Any

from .errors import UserInputError


def special_strings(tokenizer: Any) -> list[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    strings = {token.content for token in added.values() if getattr(token, "special", False)}
    strings.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return [s for s in strings if s]


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat template applied to `messages`, contents never parsed for specials."""
    specials = special_strings(tokenizer)
    if not any(s in message["content"] for message in messages for s in specials):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    # Render the template around placeholders, then tokenise markup and contents apart. One
    # pass over the text, and one batched call per kind: linear in the number of messages.
    placeholders = [f"\ue000content{i}-{secrets.token_hex(8)}\ue000" for i in range(len(messages))]
    masked = [{**message, "content": holder} for message, holder in zip(messages, placeholders)]
    text = tokenizer.apply_chat_template(masked, add_generation_prompt=True, tokenize=False)
    markup, start = [], 0
    for holder in placeholders:
        found = text.find(holder, start)
        if found < 0:  # a template that rewrites contents: we cannot place them safely
            raise UserInputError("a message contains special-token text, which this model's chat template cannot take safely")
        markup.append(text[start:found])
        start = found + len(holder)
    markup.append(text[start:])
    markup_ids = _encode_each(tokenizer, markup)
    content_ids = _encode_each(tokenizer, [m["content"] for m in messages], split_special_tokens=True)
    ids: list[int] = []
    for before, content in zip(markup_ids, content_ids):
        ids += before + content
    return ids + markup_ids[-1]


def _encode_each(tokenizer: Any, texts: list[str], **options: Any) -> list[list[int]]:
    """Token ids of each text: one batched call over the distinct texts (markup repeats a lot)."""
    distinct = list(dict.fromkeys(texts))
    ids = dict(zip(distinct, tokenizer(distinct, add_special_tokens=False, **options).input_ids))
    return [ids[text] for text in texts]
