"""Judge heads (head v2): fitted on mined labels, saved with their features and pair, a gate at decode time."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diversed import cli
from diversed.errors import HeadMismatchError, UserInputError
from diversed.features import FEATURES, PROJECTION_DIMS, PROJECTION_SEED, projection
from diversed.generation import build_verifier
from diversed.head import load_head
from diversed.judge import Judge, JudgeHead
from diversed.methods import MethodSpec
from diversed.mining import RECORDS_FILE, SETTINGS_FILE
from diversed.sampling import kl_divergence

from .test_gate_auc import write_synthetic_records


def fit(tmp_path, capsys, target: str = "t", draft: str = "d", *extra: str) -> tuple[dict, JudgeHead]:
    records = tmp_path / "records"
    write_synthetic_records(records)
    (records / SETTINGS_FILE).write_text(json.dumps({"task": "gsm8k", "target": target, "draft": draft, "backend": "torch", "temperature": 0.0}))
    assert cli.main(["fit-judge", "--records", str(records), "--label", "flip", "--out", str(tmp_path / "judge"), *extra]) == 0
    report = json.loads(capsys.readouterr().out)
    return report, load_head(tmp_path / "judge.json")


def test_fit_judge_learns_the_informative_feature_and_saves_its_spec(tmp_path, capsys):
    report, head = fit(tmp_path, capsys)
    coef = report["coef"]
    assert max(coef, key=lambda name: abs(coef[name])) == "kl_pq" and coef["kl_pq"] > 0  # the synthetic flips follow KL only
    assert isinstance(head, JudgeHead) and head.features[1] == "kl_pq" and (head.target, head.draft) == ("t", "d")
    assert head.extra["label"] == "flip" and head.extra["positions"] == 40 * 30
    saved = json.loads((tmp_path / "judge.json").read_text())
    assert saved["format"] == "diversed-judge-head/1" and len(saved["mean"]) == len(saved["features"])


def test_judge_gate_keeps_the_target_where_it_predicts_harm():
    """One feature (KL): w = 1 where P(important) > threshold, else the low weight."""
    head = JudgeHead(("kl_pq",), (0.0,), (1.0,), (10.0,), -10.0 * 0.3, "t", "d")  # P > 0.5 iff log1p(KL) > 0.3
    p = torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.05, 0.05]])
    q = torch.tensor([[0.5, 0.4, 0.1], [0.05, 0.05, 0.9]])
    kl = kl_divergence(p, q)
    assert kl[0] < 0.3 < kl[1]
    judge = Judge(head=head, threshold=0.5, low=0.2)
    assert judge.weights(p, q).tolist() == pytest.approx([0.2, 1.0])
    v = judge.verification_target(p, q, judge.context(None, None))
    assert torch.allclose(v[1], p[1]) and torch.allclose(v[0], 0.2 * p[0] + 0.8 * q[0])
    assert Judge(head=head, threshold=1.0, low=0.2).weights(p, q).tolist() == pytest.approx([0.2, 0.2])  # threshold 1: static


def test_judge_heads_refuse_other_pairs_features_and_methods(tmp_path, capsys, tiny_pair):
    _, head = fit(tmp_path, capsys)
    with pytest.raises(HeadMismatchError, match="fitted for t / d"):
        load_head(tmp_path / "judge.json", tiny_pair.signature())
    meta = json.loads((tmp_path / "judge.json").read_text())
    meta["features"][0] = "colour"
    (tmp_path / "bad.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="unknown features"):
        load_head(tmp_path / "bad.json")
    with pytest.raises(UserInputError, match="needs a judge head"):
        Judge(head=torch.nn.Linear(2, 2))
    assert cli.main(["fit-judge", "--records", str(tmp_path / "records"), "--features", "tv,colour", "--out", str(tmp_path / "x")]) == 2


def test_judge_runs_end_to_end_on_the_tiny_pair(tmp_path, capsys, tiny_pair, tiny_model_dirs):
    """A head fitted for the pair loads by path, decodes through the CLI, and `diversed:` refuses it."""
    signature = tiny_pair.signature()
    fit(tmp_path, capsys, signature.target, signature.draft)
    path = str(tmp_path / "judge.json")
    verifier = build_verifier(tiny_pair, MethodSpec.parse(f"judge:{path}:0.5"))
    assert isinstance(verifier, Judge) and verifier.threshold == 0.5
    with pytest.raises(UserInputError, match="is a judge head; use judge:"):
        build_verifier(tiny_pair, MethodSpec.parse(f"diversed:{path}"))
    target, draft = tiny_model_dirs
    code = cli.main(["generate", "hi", "--target", str(target), "--draft", str(draft), "--dtype", "float32", "--method", "judge",
                     "--head", path, "--threshold", "0.3", "--max-new-tokens", "8", "--draft-length", "2", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["method"].startswith("judge")


def test_a_hidden_state_judge_reads_both_models_projected_states():
    """Coefficients after the named features weigh features.hidden_projections (target's dims, then draft's)."""
    head = JudgeHead(("tv",), (0.0,) * 65, (1.0,) * 65, (0.0, 5.0) + (0.0,) * 63, 0.0, "t", "d", (PROJECTION_DIMS, PROJECTION_SEED))
    assert head.reads_hidden_states
    p = torch.tensor([[0.6, 0.4], [0.6, 0.4]])
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    direction = projection(8)[:, 0]  # [8]: the target state along this has projected dim 0 = |direction|^2
    target_hidden = torch.stack([direction, -direction])  # [2, 8]
    draft_hidden = torch.zeros(2, 4)
    importance = head.importance(p, q, target_hidden, draft_hidden)
    assert importance[0] > 0.5 > importance[1]
    judge = Judge(head=head, threshold=0.5, low=0.2)
    assert judge.needs_hidden_states and not Judge(head=JudgeHead(("tv",), (0.0,), (1.0,), (1.0,), 0.0, "t", "d")).needs_hidden_states
    ctx = judge.context(draft_hidden, target_hidden)
    assert judge.weights(p, q, ctx).tolist() == pytest.approx([1.0, 0.2])
    with pytest.raises(ValueError, match="reads hidden states"):
        judge.weights(p, q)


def test_fit_judge_with_hidden_states_finds_an_informative_projection(tmp_path, capsys):
    records = tmp_path / "records"
    write_synthetic_records(records)
    rows = [json.loads(line) for line in (records / RECORDS_FILE).read_text().splitlines()]
    for row in rows:  # importance now follows the target's first projected dim, not KL
        row["counterfactuals"]["flip"] = [bool(v[0] > 0.5) for v in row["target_projection"]]
    (records / RECORDS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    (records / SETTINGS_FILE).write_text(json.dumps({"task": "gsm8k", "target": "t", "draft": "d"}))
    out = tmp_path / "hidden-judge"
    assert cli.main(["fit-judge", "--records", str(records), "--label", "flip", "--hidden", "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    head = load_head(out.with_suffix(".json"))
    hidden_coef = np.abs(head.coef[len(FEATURES):])
    assert head.projection == (PROJECTION_DIMS, PROJECTION_SEED) and len(head.coef) == len(FEATURES) + 2 * PROJECTION_DIMS
    assert hidden_coef.argmax() == 0 and report["hidden_coef_norm"] > max(abs(c) for c in report["coef"].values())
    meta = json.loads(out.with_suffix(".json").read_text())
    meta["projection"] = [PROJECTION_DIMS, PROJECTION_SEED + 1]
    (tmp_path / "other.json").write_text(json.dumps(meta))
    with pytest.raises(UserInputError, match="fit it again"):
        load_head(tmp_path / "other.json")


def test_a_hidden_state_judge_decodes_on_the_tiny_pair(tmp_path, capsys, tiny_pair, tiny_model_dirs):
    signature = tiny_pair.signature()
    fit(tmp_path, capsys, signature.target, signature.draft, "--hidden")
    path = str(tmp_path / "judge.json")
    assert build_verifier(tiny_pair, MethodSpec.parse(f"judge:{path}:0.5")).needs_hidden_states
    target, draft = tiny_model_dirs
    code = cli.main(["generate", "hi", "--target", str(target), "--draft", str(draft), "--dtype", "float32", "--method", "judge",
                     "--head", path, "--max-new-tokens", "8", "--draft-length", "2", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["method"].startswith("judge")
    code = cli.main(["generate", "hi", "--target", str(target), "--draft", "ngram", "--dtype", "float32", "--method", "judge",
                     "--head", path, "--max-new-tokens", "8"])
    assert code == 2 and "hidden states" in capsys.readouterr().err


def test_a_judge_without_hidden_states_runs_with_prompt_lookup(tmp_path, capsys, tiny_pair, tiny_model_dirs):
    """A judge reads only (p, q) statistics unless fitted with --hidden, so `--draft ngram` (no
    draft model, point-mass drafts) can use it; the pair check then covers the target alone."""
    signature = tiny_pair.signature()
    fit(tmp_path, capsys, signature.target, signature.draft)
    path = str(tmp_path / "judge.json")
    target, _ = tiny_model_dirs
    args = ["generate", "the cat sat on the mat. the cat", "--raw", "--target", str(target), "--draft", "ngram", "--dtype", "float32",
            "--max-new-tokens", "8", "--draft-length", "2", "--json", "--method", "judge"]
    assert cli.main([*args, "--head", path]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"].startswith("judge") and len(out["token_ids"]) > 0
    fit(tmp_path / "other", capsys, "another-target", signature.draft)
    assert cli.main([*args, "--head", str(tmp_path / "other" / "judge.json")]) == 2
    assert "fitted for another-target" in capsys.readouterr().err
