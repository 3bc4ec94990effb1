"""Issue 40: the server is warm before it says it is ready. A real `diversed serve` on the tiny
pair, with a calibration cache of its own that starts empty: the step costs that a request's
`draft_length: "auto"` needs are measured during start-up, before the port opens, and the first
request measures nothing. (Wall times are not asserted: the machine is shared.)"""

from __future__ import annotations

import json

import httpx

from diversed.server.app import WARM_LINE
from diversed.testing import served

from .test_server import _scrape, model_dirs  # noqa: F401  (fixtures)

CALIBRATING = "calibrating step costs"  # calibration.py's line when it measures
MAX_DRAFT_LENGTH = 4


def test_the_first_request_after_ready_finds_everything_warm(model_dirs, tmp_path, monkeypatch):  # noqa: F811
    target, draft, _ = model_dirs
    calibration = tmp_path / "calibration.json"
    monkeypatch.setenv("DIVERSED_CALIBRATION", str(calibration))  # inherited by the server: nothing cached yet
    log_path = tmp_path / "server.log"
    args = ["--target", str(target), "--draft", str(draft), "--dtype", "float32", "--max-draft-length", str(MAX_DRAFT_LENGTH),
            "--log-level", "warning"]  # the default --draft-length: auto
    with served(args, log_path, threads=1) as url:
        at_ready = log_path.read_text()
        assert WARM_LINE in at_ready, at_ready
        assert at_ready.count(CALIBRATING) == 1 and at_ready.index(CALIBRATING) < at_ready.index(WARM_LINE), at_ready
        entries = json.loads(calibration.read_text())
        assert [(len(e["verify"]), e["draft_step"] is not None) for e in entries.values()] == [(MAX_DRAFT_LENGTH + 1, True)]
        assert _scrape(url)[("diversed_warmup_seconds", ())] > 0

        for _ in range(2):
            response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 8, "speculative": {"draft_length": "auto"}})
            assert response.status_code == 200, response.text
        after = log_path.read_text()
        assert after.count(CALIBRATING) == 1, after[len(at_ready):]  # nothing measured by a request
