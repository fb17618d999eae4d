"""import-pairs on the real token pairs and on broken files."""

import json
import subprocess

import pytest
from specalign.data.import_pairs import import_pairs
from specalign.data.store import FeatureStore
from specalign.specdec.metrics import Acceptance, raw_draft_proposer, simulate_greedy

from specalign.errors import DataError
from tests.conftest import shared_file


def test_real_token_pairs_import(tmp_path):
    src = shared_file("token_pairs_dsec_1s_10x10.json")
    store = FeatureStore(import_pairs(src, tmp_path / "store"))
    raw = json.loads(src.read_text())["results"]
    assert len(store) == len(raw) == 100
    assert store.kind == "tokens" and not store.has_hidden
    by_key = {r.key: r for r in store.rows}
    for r in raw:
        row = by_key[f"{r['sample_idx']}#{r['question_idx']}"]
        assert row.target_tokens == r["vl_tokens"] and row.draft_tokens == r["egpt_tokens"]
        assert row.extra["adapter_tokens"] == r["adapter_tokens"]
    # all questions of one clip stay in one split; every split is used
    for sid in {r.sample_id for r in store.rows}:
        assert len({r.split for r in store.rows if r.sample_id == sid}) == 1
    assert {r.split for r in store.rows} == {"train", "val", "test"}
    assert len(store.manifest["questions"]) == 10
    # the raw draft is almost never accepted on real outputs (about 1.02 tokens per round)
    acc = Acceptance(5)
    for row in store.rows:
        acc.add_sample(simulate_greedy(row.target_tokens, raw_draft_proposer(row.draft_tokens), 5))
    assert 1.0 <= acc.tau < 1.1 and acc.alpha < 0.05


def test_import_is_deterministic_and_resumable(tmp_path):
    src = shared_file("token_pairs_dsec_1s_10x10.json")
    a = FeatureStore(import_pairs(src, tmp_path / "a"))
    b = FeatureStore(import_pairs(src, tmp_path / "b"))
    again = FeatureStore(import_pairs(src, tmp_path / "a"))  # rerun over a finished store
    assert [(r.key, r.split) for r in a.rows] == [(r.key, r.split) for r in b.rows] == [
        (r.key, r.split) for r in again.rows]


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"),
    ('{"results": []}', "non-empty 'results'"),
    ('{"results": [{"sample_id": "a", "query": "q", "vl_tokens": [1, "x"], "egpt_tokens": []}]}',
     "vl_tokens must be a list of integer"),
    ('{"results": [{"sample_id": "a", "query": "q", "vl_tokens": [1, 40000], "egpt_tokens": []}]}',
     "outside the 32000-id vocabulary"),
    ('{"results": [{"query": "q", "vl_tokens": [1], "egpt_tokens": []}]}', "needs 'sample_id'"),
])
def test_bad_pair_files_name_the_file_and_problem(tmp_path, content, match):
    f = tmp_path / "pairs.json"
    f.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        import_pairs(f, tmp_path / "out")
    assert str(f) in str(e.value)


def test_cli_import_pairs_and_missing_file(tmp_path):
    src = shared_file("token_pairs_dsec_1s_10x10.json")
    ok = subprocess.run(["specalign", "import-pairs", f"src={src}", f"out={tmp_path / 's'}"],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "imported 100 pairs" in ok.stdout
    bad = subprocess.run(["specalign", "import-pairs", f"src={tmp_path / 'missing.json'}", f"out={tmp_path / 'x'}"],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert "src=" in bad.stderr and "missing.json: no such file or directory" in bad.stderr
    assert "Traceback" not in bad.stderr
