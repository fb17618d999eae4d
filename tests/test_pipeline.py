"""`specalign pipeline pipeline=quick` end to end, and the notebook on its output."""

import json
import os
import subprocess

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow      # the longest file: started first (tests/conftest.py LONGEST_FIRST)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    out = root / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["specalign", "pipeline", "pipeline=quick", f"out={out}", f"cache={root / 'cache'}"],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_summary_table_has_every_drafter_and_baseline(quick_run):
    out, stdout = quick_run
    summary = json.loads((out / "summary.json").read_text())
    names = {r["drafter"] for r in summary["rows"]}
    assert {"raw_draft", "draft_model", "token_adapter", "token_adapter (no_draft)",
            "eagle3_target", "eagle3_draft", "eagle3_both"} <= names
    assert "acceptance on the test split" in stdout
    for what in ("store", "runs", "drafters", "reports", "curves"):
        assert os.path.exists(summary["where"][what])
    rows = {r["drafter"]: r for r in summary["rows"]}       # each TokenAdapter row states its draft schedule
    assert rows["token_adapter"]["schedule"] == "sequential" and rows["token_adapter_stream"]["schedule"] == "concurrent"
    assert rows["token_adapter_stream (no_draft)"]["schedule"] == "none"
    assert rows["token_adapter_stream"]["e2e"] > rows["token_adapter"]["e2e"]   # nothing paid up front
    for run in ("token_adapter", "token_adapter_no_draft", "eagle3_target", "eagle3_draft", "eagle3_both"):
        assert (out / "runs" / run / "curves.png").stat().st_size > 0
        assert (out / "drafters" / run / "model.safetensors").exists()


def test_trained_drafters_beat_the_raw_draft(quick_run):
    out, _ = quick_run
    rows = {r["drafter"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    raw = rows["raw_draft"]["tau"]
    for name in ("token_adapter", "token_adapter (no_draft)", "eagle3_target", "eagle3_draft", "eagle3_both"):
        assert rows[name]["tau"] > raw, (name, rows[name]["tau"], raw)


def test_online_decoding_agrees_with_offline(quick_run):
    out, _ = quick_run
    online = json.loads((out / "reports" / "token_adapter_online" / "report.json").read_text())
    assert online["mode"] == "online"
    checks = online["checks"]
    n = checks["requests"]
    assert n > 0 and checks["target_greedy_equals_store"] == n
    for name in ("drafter", "no_draft", "raw_draft", "draft_model"):
        assert set(checks["online_equals_target_greedy"][name].values()) == {n}, checks


def test_notebook_runs_top_to_bottom(quick_run):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    out, _ = quick_run
    nb = nbformat.read(REPO / "notebooks" / "acceptance.ipynb", as_version=4)
    os.environ["SPECALIGN_RUN"] = str(out)
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
                                ).execute()
    finally:
        os.environ.pop("SPECALIGN_RUN")
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "TokenAdapter:" in text and "rounds" in text
