"""Ensemble head: initial output, save/load round trip, pair checks."""

from __future__ import annotations

import json

import pytest
import torch

from diversed.errors import HeadMismatchError, UserInputError
from diversed.head import EnsembleHead, HeadConfig, PairSignature, load_head

PAIR = PairSignature("t", "d", target_hidden_size=6, draft_hidden_size=4, vocab_size=100)


def test_initial_weight_is_one_half():
    head = EnsembleHead(HeadConfig(PAIR))
    w = head(torch.randn(7, 4), torch.randn(7, 6))
    assert w.shape == (7,) and torch.allclose(w, torch.full((7,), 0.5))
    assert sum(p.numel() for p in head.parameters()) == 2 * (4 + 6) + 2


def test_save_load_round_trip(tmp_path):
    head = EnsembleHead(HeadConfig(PAIR, {"task": "gsm8k"}))
    torch.nn.init.normal_(head.linear.weight)
    path = head.save(tmp_path / "my-head")
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["pair"]["target"] == "t" and meta["task"] == "gsm8k"
    loaded = load_head(tmp_path / "my-head", PAIR)
    x_d, x_t = torch.randn(3, 4), torch.randn(3, 6)
    assert torch.allclose(loaded(x_d, x_t), head(x_d, x_t))
    assert load_head(str(path), PAIR).config.extra["task"] == "gsm8k"  # with the suffix too


def test_a_head_name_with_a_dot_keeps_it(tmp_path):
    """`cascade-0.3` is a name, not a file suffix: its files are cascade-0.3.json and .safetensors."""
    head = EnsembleHead(HeadConfig(PAIR, {"task": "gsm8k"}))
    torch.nn.init.normal_(head.linear.weight)
    path = head.save(tmp_path / "cascade-0.3")
    assert path.name == "cascade-0.3.safetensors" and (tmp_path / "cascade-0.3.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cascade-0.3.json", "cascade-0.3.safetensors"]
    head.save(tmp_path / "cascade-0.7")  # a sibling must not overwrite it
    x_d, x_t = torch.randn(3, 4), torch.randn(3, 6)
    assert torch.allclose(load_head(tmp_path / "cascade-0.3", PAIR)(x_d, x_t), head(x_d, x_t))
    assert load_head(tmp_path / "cascade-0.3.json", PAIR).config.extra["task"] == "gsm8k"


def test_loading_for_another_pair_is_an_error(tmp_path):
    EnsembleHead(HeadConfig(PAIR)).save(tmp_path / "h")
    other = PairSignature("t", "other-draft", 6, 4, 100)
    with pytest.raises(HeadMismatchError, match="draft"):
        load_head(tmp_path / "h", other)


def test_missing_head_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="no head at"):
        load_head(tmp_path / "nothing")


def test_default_method_uses_only_the_designated_head(tmp_path):
    """A shipped task head never silently becomes the default; the designated one does, for its own pair."""
    from types import SimpleNamespace

    from diversed.generation import MethodSpec, default_method

    EnsembleHead(HeadConfig(PAIR)).save(tmp_path / "general")
    pair = SimpleNamespace(signature=lambda: PAIR)
    other_pair = SimpleNamespace(signature=lambda: PairSignature("t", "other-draft", 6, 4, 100))
    assert default_method(pair, default_head=str(tmp_path / "general"))[0] == MethodSpec("diversed", head=str(tmp_path / "general"))
    # Without a head, issue 23's written rule decides (tests/test_default_rule.py): exact until a
    # relaxed method is shown non-inferior on every task.
    assert default_method(pair, default_head=None)[0] == MethodSpec("exact")
    assert default_method(other_pair, default_head=str(tmp_path / "general"))[0].method == "exact"
    assert default_method(pair, default_head=None, proposer="ngram")[0] == MethodSpec("exact")
