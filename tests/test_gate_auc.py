"""benchmarks/gate_auc.py on synthetic records whose one informative feature is known."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from diversed.mining import FEATURES, PROJECTION_DIMS, RECORDS_FILE, TOKEN_CLASSES

from .conftest import REPO


def _gate_auc():
    spec = importlib.util.spec_from_file_location("gate_auc", REPO / "benchmarks" / "gate_auc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_synthetic_records(out: Path, problems: int = 40, positions: int = 30, seed: int = 0) -> None:
    """Every position a mismatch; importance depends on kl_pq only (the others are noise)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    with open(out / RECORDS_FILE, "w") as f:
        for i in range(problems):
            features = {name: rng.random(positions).tolist() for name in FEATURES}
            kl = np.asarray(features["kl_pq"])
            flip = (kl + 0.15 * rng.standard_normal(positions) > 0.7).tolist()
            ll_delta = (-4 * kl + 0.5 * rng.standard_normal(positions)).tolist()
            every = list(range(positions))
            record = {
                "id": f"p{i}", "positions": positions, "features": features,
                "token_class": rng.integers(0, len(TOKEN_CLASSES), positions).tolist(),
                "target_projection": rng.standard_normal((positions, PROJECTION_DIMS)).tolist(),
                "draft_projection": rng.standard_normal((positions, PROJECTION_DIMS)).tolist(),
                "mismatches": {"position": every, "draft_token": [0] * positions},
                "likelihood": {"position": every, "ll_delta": ll_delta, "ll_delta_window": ll_delta},
                "counterfactuals": {"position": every, "flip": flip},
            }  # fmt: skip
            f.write(json.dumps(record) + "\n")


def test_gate_auc_finds_the_informative_feature(tmp_path, capsys):
    records = tmp_path / "records"
    write_synthetic_records(records)
    out = tmp_path / "gate.json"
    assert _gate_auc().main(["--records", str(records), "--bootstrap", "50", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| kl_pq | + |" in table and "logistic: scalars + hidden" in table
    reports = {r["label"]: {row["name"]: row for row in r["rows"]} for r in json.loads(out.read_text())["reports"]}
    for label in ("flip", "lldrop"):
        rows = reports[label]
        assert rows["kl_pq"]["auc"] > 0.85 and rows["kl_pq"]["direction"] == "+"
        assert rows["logistic: scalars"]["auc"] > 0.85
        assert 0.3 < rows["tv"]["auc"] < 0.7 and 0.3 < rows["logistic: hidden projections"]["auc"] < 0.7  # noise
        low, high = rows["kl_pq"]["ci"]
        assert low <= rows["kl_pq"]["auc"] <= high


def test_gate_auc_bad_input_is_one_line(tmp_path, capsys):
    assert _gate_auc().main(["--records", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
