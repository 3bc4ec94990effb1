"""Prompt-lookup drafting (`--draft ngram`): the lookup itself, the point-mass law every
verifier must handle exactly, greedy losslessness, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from diversed.engine import GenerationConfig
from diversed.errors import UserInputError
from diversed.generation import MethodSpec, generate
from diversed.proposers import NgramProposer, get_proposer, lookup_continuation, point_masses
from diversed.sampling import SamplingParams
from diversed.verifiers import Exact, Lenient, SpeculativeCascade, StaticEnsemble, TypicalAcceptance, induced_distribution

GREEDY = SamplingParams(temperature=0.0)


def test_lookup_takes_the_latest_longest_match():
    context = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert lookup_continuation(context, 2, 1, 3) == [7, 8]  # latest earlier "1 2 3" is followed by 7 8
    assert lookup_continuation([4, 5, 6, 4, 5], 3, 1, 3) == [6, 4, 5]
    assert lookup_continuation([1, 2, 3], 4, 1, 3) == []  # nothing repeats
    assert lookup_continuation([7], 4, 1, 3) == []
    assert lookup_continuation([5, 6, 5], 4, 2, 3) == []  # a 1-gram match is below min_ngram
    with pytest.raises(UserInputError):
        NgramProposer(min_ngram=3, max_ngram=2)


@pytest.mark.parametrize(
    "verifier, expected",
    [
        (Exact(), lambda p, onehot: p),
        (StaticEnsemble(0.7), lambda p, onehot: 0.7 * p + 0.3 * onehot),
        (SpeculativeCascade("opt", 0.3), None),
        (Lenient(0.5), None),
        (TypicalAcceptance(0.3, 0.5), None),
    ],
    ids=["exact", "static", "cascade", "lenient", "typical"],
)
def test_point_mass_drafts_emit_the_verifiers_law(verifier, expected):
    """With q = delta_x the emitted law is exactly v: exact accepts x with p(x) and recovers from
    norm(p - delta_x)+; the static mixture is w p + (1 - w) delta_x. Every verifier's emitted
    law is a distribution and equals its own enumeration."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(4, 12, dtype=torch.float64) * 2, -1)  # [N, V]
    drafted = torch.tensor([0, 3, 7, 11])
    q = point_masses(drafted, 12).double()  # [N, V]
    emitted = induced_distribution(verifier, p, q)
    torch.testing.assert_close(emitted.sum(-1), torch.ones(4, dtype=torch.float64))
    if expected is not None:
        torch.testing.assert_close(emitted, expected(p, q))
    if isinstance(verifier, Exact):
        accept = (q * verifier.acceptance(p, q, None)).sum(-1)
        torch.testing.assert_close(accept, p.gather(-1, drafted[:, None])[:, 0])  # accepts x with p(x)


@pytest.mark.parametrize("draft_length", [1, 4])
def test_ngram_greedy_exact_equals_ar(tiny_pair, draft_length):
    prompt = tiny_pair.tokenizer("abcabcabc abcabc", add_special_tokens=False).input_ids
    config = GenerationConfig(max_new_tokens=48, draft_length=draft_length, sampling=GREEDY, ignore_eos=True, proposer="ngram")
    ours = generate(tiny_pair, prompt, MethodSpec("exact"), config)
    assert ours.token_ids == generate(tiny_pair, prompt, MethodSpec("ar"), config).token_ids
    assert ours.metrics.drafted > 0


def test_ngram_needs_no_draft_model(tiny_model_dirs):
    from diversed.models import load_pair

    target_only = load_pair(str(tiny_model_dirs[0]), dtype="float32", with_draft=False)
    config = GenerationConfig(max_new_tokens=20, draft_length=3, seed=0, ignore_eos=True, proposer="ngram")
    result = generate(target_only, "abababab", MethodSpec("static", weight=0.5), config)
    assert len(result.token_ids) == 20
    with pytest.raises(UserInputError, match="draft model"):
        generate(target_only, "abababab", MethodSpec("static", weight=0.5), GenerationConfig(max_new_tokens=4))


def test_diversed_with_ngram_is_refused(tiny_pair, tmp_path):
    from diversed.head import EnsembleHead, HeadConfig

    head = EnsembleHead(HeadConfig(tiny_pair.signature())).save(tmp_path / "head").with_suffix("")
    with pytest.raises(UserInputError, match="ngram"):
        generate(tiny_pair, "hi", MethodSpec("diversed", head=str(head)), GenerationConfig(max_new_tokens=4, proposer="ngram"))
    with pytest.raises(UserInputError, match="proposer"):
        GenerationConfig(proposer="medusa")


def test_a_backend_without_hidden_states_is_named_in_the_refusal(tiny_pair, tmp_path):
    """The model proposer asks the backend (no runner is built); a head that reads hidden states is refused by name."""
    import dataclasses

    from diversed.head import EnsembleHead, HeadConfig
    from diversed.runners.hf import TorchBackend

    class LogitsOnlyBackend(TorchBackend):
        name = "logits-only"
        returns_hidden_states = False

    draft_model = get_proposer("model")
    assert draft_model.missing_hidden_states(tiny_pair) is None
    logits_only = dataclasses.replace(tiny_pair, backend=LogitsOnlyBackend())
    assert "logits-only backend does not return" in draft_model.missing_hidden_states(logits_only)
    head = EnsembleHead(HeadConfig(tiny_pair.signature())).save(tmp_path / "head").with_suffix("")
    with pytest.raises(UserInputError, match="logits-only"):
        generate(logits_only, "hi", MethodSpec("diversed", head=str(head)), GenerationConfig(max_new_tokens=4))


def test_cli_draft_ngram(tiny_model_dirs, tiny_pair, tmp_path):
    from diversed.head import EnsembleHead, HeadConfig

    target = str(tiny_model_dirs[0])
    base = [sys.executable, "-m", "diversed.cli", "generate", "abcabcabc", "--raw", "--target", target, "--draft", "ngram",
            "--max-new-tokens", "16", "--draft-length", "3", "--seed", "0"]
    done = subprocess.run([*base, "--method", "exact", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["token_ids"]) <= 16
    # No --method: the proposer's default by issue 23's rule (exact until a static weight is shown non-inferior).
    default = subprocess.run([*base, "--json"], capture_output=True, text=True, timeout=300)
    assert default.returncode == 0 and json.loads(default.stdout)["method"] == "exact" and "lossless" in default.stderr
    head = EnsembleHead(HeadConfig(tiny_pair.signature())).save(tmp_path / "h").with_suffix("")
    refused = subprocess.run([*base, "--method", "diversed", "--head", str(head)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "ngram" in refused.stderr
