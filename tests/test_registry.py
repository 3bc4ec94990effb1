"""The method registry: spec strings and labels, knobs every front derives, errors naming their parameter."""

from __future__ import annotations

import argparse
import importlib.util

import pytest

from diversed.cli import main
from diversed.commands.args import add_method_args, method_spec_from_args
from diversed.errors import UserInputError
from diversed.methods import METHODS, MethodSpec, knob_owners, make_verifier, spec_from_knobs
from diversed.verifiers import SpeculativeCascade, TypicalAcceptance

from .conftest import REPO

# Labels rows.jsonl files in docs/results key on: they must not change.
LABELS = ["ar", "exact", "static:0.9", "static:0.7", "static:0.5", "static:0.1", "diversed:gsm8k", "diversed:mbpp",
          "lenient:0.5", "cascade:token", "cascade:token:0.1", "cascade:chow:0.2", "typical", "klgate:0.5:0.1", "entgate:1.5:0"]


@pytest.mark.parametrize("label", LABELS)
def test_labels_round_trip_exactly(label):
    assert MethodSpec.parse(label).label == label


def test_defaults_fill_labels_as_before():
    assert MethodSpec("static").label == "static:0.9"
    assert MethodSpec("cascade").label == "cascade:token"
    assert MethodSpec("cascade", alpha=0.2).label == "cascade:token:0.2"
    assert MethodSpec("klgate", low_weight=0.2).label == "klgate:0.5:0.2"
    assert MethodSpec("diversed").label == "diversed"


def test_every_registered_method_is_a_method():
    assert METHODS[0] == "ar" and set(METHODS) >= {"exact", "static", "diversed", "lenient", "cascade", "typical", "klgate", "entgate"}


def test_typical_knobs_have_a_way_in():
    spec = MethodSpec.parse("typical:0.05:0.2")
    assert (spec.eps, spec.alpha) == (0.05, 0.2)
    verifier = make_verifier(spec.method, **spec.verifier_knobs())
    assert isinstance(verifier, TypicalAcceptance) and (verifier.eps, verifier.alpha) == (0.05, 0.2)


def test_cascade_has_its_own_alpha_and_lenience_still_sets_it():
    assert MethodSpec("cascade", rule="chow", lenience=0.2) == MethodSpec("cascade", rule="chow", alpha=0.2)
    verifier = make_verifier("cascade", lenience=0.3)
    assert isinstance(verifier, SpeculativeCascade) and verifier.alpha == 0.3
    with pytest.raises(UserInputError):
        MethodSpec("cascade", alpha=0.1, lenience=0.2)  # one knob, given twice


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_method_args(parser)
    return parser.parse_args(argv)


def test_cli_flags_come_from_the_registry():
    assert method_spec_from_args(cli_args("--method", "typical", "--eps", "0.05", "--alpha", "0.2")) == MethodSpec("typical", eps=0.05, alpha=0.2)
    assert method_spec_from_args(cli_args("--method", "cascade", "--rule", "token", "--lenience", "0.1")).label == "cascade:token:0.1"
    assert method_spec_from_args(cli_args("--weight", "0.7")) == MethodSpec("static", weight=0.7)
    assert method_spec_from_args(cli_args()) is None
    assert set(knob_owners()) <= set(vars(cli_args()))


@pytest.mark.parametrize(
    "method, knobs, params",
    [
        ("static", {"weight": 1.5}, ("weight",)),
        ("exact", {"weight": 0.5}, ("weight", "method")),
        ("klgate", {"low_weight": 1.0}, ("low_weight",)),
        (None, {"lenience": 0.3, "rule": "chow"}, ("lenience", "rule", "method")),
        ("diversed", {}, ("method", "head")),
    ],
)
def test_errors_name_their_parameter_and_each_front_phrases_it(method, knobs, params):
    with pytest.raises(UserInputError) as caught:
        spec = spec_from_knobs(method, knobs)
        make_verifier(spec.method, **spec.verifier_knobs())
    error = caught.value
    assert error.params == params and error.param == params[0]
    as_flags = error.render(lambda name: "--" + name.replace("_", "-"))
    as_fields = error.render(lambda name: "speculative." + name)
    for name in params:
        assert "--" + name.replace("_", "-") in as_flags and "speculative." + name in as_fields


def test_cli_prints_the_flag(capsys):
    assert main(["generate", "a prompt", "--method", "klgate", "--low-weight", "1"]) == 2
    err = capsys.readouterr().err
    assert "--low-weight" in err and "{" not in err


def test_a_knob_without_a_method_is_an_error_on_the_cli_too(capsys):
    assert main(["generate", "a prompt", "--lenience", "0.3"]) == 2
    assert "--lenience does not apply without --method" in capsys.readouterr().err


def test_readme_method_table_matches_the_registry():
    spec = importlib.util.spec_from_file_location("method_table", REPO / "scripts" / "method_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0, "run python scripts/method_table.py"
