"""The vLLM plugin's logic without vLLM: batched verification, request checks, the version pin.

`verify_batch` is what vLLM's rejection sampler calls for relaxed methods; here it runs on
fixed [T, V] distributions with thousands of requests in one batch, half `exact` and half
`static:0.5`, and each half's joint law of (first, second) output slot is checked against the
verifier's own tables by chi-square; a wrong law is rejected. Through vLLM itself:
tests/test_vllm_law.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from diversed.integrations.vllm import UnsupportedVllmError, check_vllm_version
from diversed.guard import Guarded
from diversed.integrations.vllm.requests import (VLLM_METHODS, RequestError, check_guardable, check_usable, default_spec, guard_vocabulary,
                                                 request_spec)
from diversed.integrations.vllm.verification import PLACEHOLDER_TOKEN_ID, BatchLayout, verify_batch
from diversed.methods import MethodSpec
from diversed.verifiers import EMPTY_CONTEXT, Exact, StaticEnsemble, Verifier

from .test_engine_statistics import chi_square_pvalue

V, K, REQUESTS = 6, 2, 12000
BONUS = 99  # a marker the bonus slot must hold


def _distributions():
    generator = torch.Generator().manual_seed(1)
    p = torch.softmax(2 * torch.randn(K, V, generator=generator), -1)
    q = torch.softmax(2 * torch.randn(K, V, generator=generator), -1)
    return p, q


def _run_batch(verifiers: list[Verifier], seed: int = 0, generators: dict | None = None):
    p, q = _distributions()
    batch = len(verifiers)
    generator = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(q[k], batch, replacement=True, generator=generator) for k in range(K)], 1)  # [B, K]
    uniforms = torch.rand(batch * K, generator=generator, dtype=torch.float64)
    torch.manual_seed(seed + 7919)  # not the uniforms' stream: recovered draws must be independent of them
    output = torch.full((batch, K + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int32)
    return verify_batch(verifiers, drafts.reshape(-1).to(torch.int32), BatchLayout([K] * batch), K, q.repeat(batch, 1), p.repeat(batch, 1),
                        torch.full((batch, 1), BONUS), uniforms, generators or {}, output), drafts


def _theory(verifier: Verifier) -> dict:
    """P(first slot, second slot) of one request; a second slot of -1 means the round ended at the first."""
    p, q = _distributions()
    tables = verifier.tables(p, q, EMPTY_CONTEXT)
    kept = q * tables.acceptance  # [K, V]
    theory = {(y, PLACEHOLDER_TOKEN_ID): float((1 - kept[0].sum()) * tables.residual[0, y]) for y in range(V)}
    for x in range(V):
        for y in range(V):
            theory[(x, y)] = float(kept[0, x] * tables.emitted[1, y])
    return theory


def _observed(output: torch.Tensor, rows) -> dict:
    counts: dict = {}
    for first, second in output[rows, :2].tolist():
        counts[(first, second)] = counts.get((first, second), 0) + 1
    return counts


def test_a_mixed_batch_follows_each_methods_law():
    verifiers = [Exact() if i % 2 else StaticEnsemble(0.5) for i in range(REQUESTS)]
    output, _ = _run_batch(verifiers)
    for parity, verifier in ((1, Exact()), (0, StaticEnsemble(0.5))):
        rows = list(range(parity, REQUESTS, 2))
        assert chi_square_pvalue(_observed(output, rows), _theory(verifier), len(rows)) > 1e-4
    # power: static's outputs are not exact's law
    assert chi_square_pvalue(_observed(output, list(range(0, REQUESTS, 2))), _theory(Exact()), REQUESTS // 2) < 1e-6


def test_the_round_structure_matches_vllms():
    output, drafts = _run_batch([StaticEnsemble(0.5)] * 2000)
    for row, drafted in zip(output.tolist(), drafts.tolist()):
        k = next((j for j in range(K) if row[j] != drafted[j]), K)
        if k == K:
            assert row[K] == BONUS  # all accepted: the bonus token follows
        else:
            assert row[k] != PLACEHOLDER_TOKEN_ID and all(t == PLACEHOLDER_TOKEN_ID for t in row[k + 1:])


def test_requests_left_to_vllm_are_untouched_and_seeds_repeat():
    output, _ = _run_batch([None, StaticEnsemble(0.5)] * 50)
    assert (output[0::2] == PLACEHOLDER_TOKEN_ID).all()
    seeded = {i: torch.Generator().manual_seed(i) for i in range(100)}
    first, _ = _run_batch([StaticEnsemble(0.5)] * 100, seed=3, generators=seeded)
    seeded = {i: torch.Generator().manual_seed(i) for i in range(100)}
    torch.manual_seed(12345)  # the global RNG differs; seeded requests must not care
    again, _ = _run_batch([StaticEnsemble(0.5)] * 100, seed=3, generators=seeded)
    assert torch.equal(first, again)


def test_request_methods_are_checked_like_the_servers():
    default = MethodSpec("exact")
    assert request_spec(None, default) is default
    assert request_spec({"speculative": {"method": "static", "weight": 0.5}}, default).label == "static:0.5"
    assert request_spec({"speculative": {"weight": 0.7}}, default).label == "static:0.7"
    assert request_spec({"speculative": {"method": "cascade", "rule": "opt", "alpha": 0}}, default).label == "cascade:opt:0"
    bad = {
        "speculative.method": {"method": "statc"},
        "speculative.weight": {"method": "static", "weight": 1.5},
        "speculative.wieght": {"method": "static", "wieght": 0.5},
        "speculative.draft_length": {"draft_length": 3},
    }
    for field, options in bad.items():
        with pytest.raises(RequestError) as caught:
            request_spec({"speculative": options}, default)
        assert caught.value.field == field and field in str(caught.value)
    for method in ("diversed", "judge", "lenient", "typical"):
        with pytest.raises(RequestError, match="vLLM cannot verify against"):
            request_spec({"speculative": {"method": method}}, default)
    assert set(VLLM_METHODS) == {"exact", "static", "cascade", "klgate", "entgate"}


def test_guarded_requests_are_checked_like_the_servers(monkeypatch):
    default = MethodSpec("exact")
    spec = request_spec({"speculative": {"method": "static", "weight": 0.5, "guard": 0.05, "guard_tokens": "####"}}, default)
    assert spec.label == "static:0.5:0.05:####"
    assert request_spec({"speculative": {"method": "cascade", "rule": "opt", "alpha": 0, "guard_tokens": "<digits>"}}, default).guard_tokens == "<digits>"
    for options in ({"method": "static", "weight": 0.5, "guard": 0}, {"method": "static", "weight": 0.5, "guard": 1.5}):
        with pytest.raises(RequestError) as caught:
            request_spec({"speculative": options}, default)
        assert caught.value.field == "speculative.guard"
    monkeypatch.setenv("DIVERSED_VLLM_METHOD", "static:0.5:0.05")
    assert default_spec().label == "static:0.5:0.05"


def test_the_guard_watches_vllms_stop_ids_and_the_tokenizers_eos():
    from diversed.testing import build_char_tokenizer

    tokenizer = build_char_tokenizer("ab#")
    eos = tokenizer.eos_token_id
    # vLLM's all_stop_token_ids holds EOS even with ignore_eos; the tokenizer's EOS is added if it does not
    assert guard_vocabulary(tokenizer, set()).stop_token_ids == (eos,)
    assert guard_vocabulary(tokenizer, {eos, 7, 6}).stop_token_ids == tuple(sorted({eos, 6, 7}))
    guarded = MethodSpec.parse("static:0.5:0.05")
    check_guardable(guarded, tokenizer, set())
    check_guardable(MethodSpec.parse("static:0.5"), None, set())  # no guard: nothing to check
    with pytest.raises(RequestError, match="without a tokenizer") as caught:
        check_guardable(guarded, None, {eos})
    assert caught.value.field == "speculative.guard"

    class NoEos:
        eos_token_id = None

    with pytest.raises(RequestError, match="no tokens to watch"):
        check_guardable(guarded, NoEos(), set())
    check_guardable(guarded, NoEos(), {3})
    check_guardable(MethodSpec.parse("static:0.5:0.05:##"), NoEos(), set())


def test_the_worker_builds_each_guard_once(monkeypatch):
    """Requests alike share one verifier, whose token set is built (and the vocabulary decoded) once."""
    from types import SimpleNamespace

    from diversed import guard
    from diversed.integrations.vllm import plugin
    from diversed.testing import build_char_tokenizer

    tokenizer = build_char_tokenizer("ab#")
    decoded = []
    token_texts = guard._token_texts
    monkeypatch.setattr(guard, "_token_texts", lambda t: decoded.append(t) or token_texts(t))
    monkeypatch.setattr(plugin, "_tokenizer", lambda model_config: tokenizer)
    monkeypatch.setattr(plugin, "_VERIFIERS", plugin.OrderedDict())
    runner = SimpleNamespace(model_config=None)
    default = MethodSpec("exact")

    def request(options, stop_ids=(1,)):
        return SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"speculative": options}, all_stop_token_ids=set(stop_ids)))

    options = {"method": "static", "weight": 0.5, "guard": 0.05, "guard_tokens": "#"}
    first, second = (plugin._request_verifier(runner, request(options), default) for _ in range(2))
    assert isinstance(first, Guarded) and first is second
    assert first.token_ids == tuple(sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("#")}))
    other = plugin._request_verifier(runner, request(options, stop_ids=(1, 5)), default)  # its own stop ids: its own guard
    assert other is not first and 5 in other.token_ids
    assert len(decoded) == 1  # the vocabulary's texts, once per tokenizer
    assert plugin._request_verifier(runner, request({"method": "static", "weight": 0.5}), default) == StaticEnsemble(0.5)
    assert plugin._request_verifier(runner, request({"method": "exact"}), default) is None


def test_relaxed_methods_need_sampled_drafts():
    static = MethodSpec("static", weight=0.5)
    check_usable(static, temperature=1.0, draft_probs_available=True)
    check_usable(MethodSpec("exact"), temperature=0.0, draft_probs_available=False)
    with pytest.raises(RequestError, match="probabilistic"):
        check_usable(static, temperature=1.0, draft_probs_available=False)
    with pytest.raises(RequestError, match="temperature"):
        check_usable(static, temperature=0.0, draft_probs_available=True)


def test_the_default_method_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DIVERSED_VLLM_METHOD", "cascade:opt:0")
    assert default_spec().label == "cascade:opt:0"
    monkeypatch.setenv("DIVERSED_VLLM_METHOD", "diversed:gsm8k")
    with pytest.raises(ValueError, match="vLLM cannot verify against diversed"):
        default_spec()


def test_only_the_tested_vllm_is_accepted(monkeypatch):
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.0+cpu")
    monkeypatch.delenv("DIVERSED_VLLM_ANY_VERSION", raising=False)
    with pytest.raises(UnsupportedVllmError, match="tested with vLLM 0.32.0 only") as caught:
        check_vllm_version("0.33.1")
    assert "\n" not in str(caught.value)
    monkeypatch.setenv("DIVERSED_VLLM_ANY_VERSION", "1")
    check_vllm_version("0.33.1")


def test_the_cpu_expand_replacement_matches_the_definition():
    from diversed.integrations.vllm.plugin import expand_batch_to_tokens

    x = torch.tensor([1.0, 0.0, 0.7])
    expanded = expand_batch_to_tokens(x, torch.tensor([2, 3, 6], dtype=torch.int32), 6, replace_from=0, replace_to=1)
    assert expanded.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.7, 0.7, 0.7])
    top_k = expand_batch_to_tokens(torch.tensor([5, 7], dtype=torch.int32), torch.tensor([1, 3], dtype=torch.int32), 3)
    assert top_k.tolist() == [5, 7, 7] and top_k.dtype == torch.int32


def test_engine_vllm_without_vllm_is_one_line(monkeypatch, capsys):
    import sys

    from diversed.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed
    assert main(["serve", "--engine", "vllm", "--method", "static", "--weight", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --engine vllm needs vLLM 0.32.0") and "\n" not in err


def test_engine_vllm_refuses_a_method_vllm_cannot_verify(monkeypatch, capsys):
    from diversed.cli import main
    from diversed.integrations.vllm import launch

    monkeypatch.setattr(launch, "require_vllm", lambda: "0.32.0")
    assert main(["serve", "--engine", "vllm", "--method", "lenient"]) == 2
    assert "--engine vllm verifies with exact, static, cascade, klgate, entgate" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--methods", "ar,exact"], "--engine vllm cannot run ar: speculative.method 'ar': vLLM cannot verify against ar"),
    (["--methods", "diversed:gsm8k"], "--engine vllm cannot run diversed:gsm8k"),
    (["--methods", "static:0.5", "--temperature", "0"], "needs temperature > 0"),
    (["--methods", "exact", "--lockstep", "8"], "drop --lockstep with --engine vllm"),
    (["--methods", "exact", "--draft", "ngram"], "--draft ngram runs on our engine"),
    (["--methods", "exact", "--draft-length", "auto"], "pass --draft-length N"),
])
def test_eval_engine_vllm_refuses_what_it_cannot_run_in_one_line(tmp_path, capsys, flags, message):
    from diversed.cli import main

    from .conftest import FIXTURE_DATA

    code = main(["eval", "--engine", "vllm", "--task", "gsm8k", "--n", "1", "--data-dir", str(FIXTURE_DATA), "--out", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()  # refused before the folder records any settings


def test_eval_engine_vllm_without_vllm_is_one_line(monkeypatch, tmp_path, capsys):
    import sys

    from diversed.cli import main

    from .conftest import FIXTURE_DATA

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vLLM were not installed
    assert main(["eval", "--engine", "vllm", "--task", "gsm8k", "--n", "1", "--methods", "exact", "--data-dir", str(FIXTURE_DATA),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --engine vllm needs vLLM 0.32.0") and "\n" not in err


@pytest.mark.parametrize("flags, cuda, expected", [
    (["avx2"], False, "float32"), (["avx2", "avx512f", "avx512_bf16"], False, "bfloat16"), (["amx_bf16"], False, "bfloat16"), ([], True, "bfloat16")])
def test_vllms_default_dtype_follows_the_machine(monkeypatch, flags, cuda, expected):
    from diversed import calibration
    from diversed.integrations.vllm import launch

    monkeypatch.setattr(calibration, "cpu_description", lambda: ("a CPU", flags))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert launch.default_dtype() == expected


def test_serve_engine_vllm_without_dtype_names_one(monkeypatch):
    """`diversed serve --engine vllm` with no --dtype hands vLLM the machine's default, not None."""
    import os

    from diversed.cli import main
    from diversed.integrations.vllm import launch

    started = {}
    monkeypatch.setattr(launch, "require_vllm", lambda: "0.32.0")
    monkeypatch.setattr(launch, "model_paths", lambda target, draft: ("/m/target", "/m/draft"))
    monkeypatch.setattr(os, "execve", lambda path, argv, env: started.update(argv=argv))
    main(["serve", "--engine", "vllm", "--method", "static", "--weight", "0.5"])
    argv = started["argv"]
    assert all(isinstance(arg, str) for arg in argv) and argv[argv.index("--dtype") + 1] == launch.default_dtype()


def test_the_vllm_server_command_line():
    from diversed.integrations.vllm.launch import serve_argv

    argv = serve_argv("/m/target", "/m/draft", host="127.0.0.1", port=8001, model_name=None, dtype="bfloat16")
    assert argv[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/m/target"]
    speculative = json.loads(argv[argv.index("--speculative-config") + 1])
    assert speculative["model"] == "/m/draft" and speculative["draft_sample_method"] == "probabilistic"
    assert argv[argv.index("--per-request-spec-decode-metrics") + 1] == "summary"
