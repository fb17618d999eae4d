"""Feature store: round trip, resume after a kill, manifest checks, memory-mapped rows."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from specalign.data.store import FeatureStore, StoreWriter, split_of

from specalign.errors import DataError, StoreMismatch

MANIFEST = {"kind": "full", "target": {"name": "t", "vocab_size": 50}, "draft": {"name": "d", "vocab_size": 50},
            "layers": {"target": [2, 3], "draft": [2, 3]}, "dtype": "bfloat16",
            "prompts": {"target": "T {question}", "draft": "D {question}"}, "generation": {"max_new_tokens": 8}}


def _rows(n, start=0):
    g = torch.Generator().manual_seed(start)
    rows = []
    for i in range(start, start + n):
        L = 3 + i % 4
        rows.append({"sample_id": f"s{i:03d}", "question_id": 0, "question": "q", "split": split_of(f"s{i:03d}"),
                     "target_tokens": torch.randint(3, 50, (L,), generator=g).tolist(),
                     "draft_tokens": [5, 6, 2]})
    return rows


def _tensors(rows, seed):
    n = sum(len(r["target_tokens"]) for r in rows)
    g = torch.Generator().manual_seed(seed)
    names = ["target.h2", "target.h3", "target.final", "draft.h2", "draft.h3", "draft.final"]
    return {k: torch.randn(n, 8, generator=g).to(torch.bfloat16) for k in names}


def test_round_trip_rows_and_hidden(tmp_path):
    rows = _rows(5)
    tens = _tensors(rows, 0)
    w = StoreWriter(tmp_path, MANIFEST)
    w.write_shard(rows[:2], {k: v[: sum(len(r["target_tokens"]) for r in rows[:2])] for k, v in tens.items()})
    off = sum(len(r["target_tokens"]) for r in rows[:2])
    w.write_shard(rows[2:], {k: v[off:] for k, v in tens.items()})
    w.save_heads({"target.lm_head": torch.randn(50, 8)})
    w.finalize()
    store = FeatureStore(tmp_path)
    assert len(store) == 5 and store.has_hidden
    cursor = 0
    for r, orig in zip(store.rows, rows):
        assert r.target_tokens == orig["target_tokens"]
        n = len(orig["target_tokens"])
        assert torch.equal(store.hidden(r, "target.final"), tens["target.final"][cursor:cursor + n])
        cursor += n
    assert store.feature_names("target") == ["target.h2", "target.h3", "target.final"]
    assert store.heads()["target.lm_head"].shape == (50, 8)
    assert sum(len(store.select(s)) for s in ("train", "val", "test")) == 5
    ds = store.to_hf_dataset()
    assert ds["target_tokens"] == [r["target_tokens"] for r in rows]
    assert len(store.to_hf_dataset("train")) == len(store.select("train"))


def test_consumer_with_other_expectations_is_refused(tmp_path):
    w = StoreWriter(tmp_path, MANIFEST)
    w.write_shard(_rows(1))
    w.finalize()
    with pytest.raises(StoreMismatch, match="layers.target"):
        FeatureStore(tmp_path, expect={"layers": {"target": [2, 16, 29]}})
    with pytest.raises(StoreMismatch, match="existing store with other settings"):
        StoreWriter(tmp_path, {**MANIFEST, "dtype": "float32"})


def test_incomplete_or_missing_store_gives_clear_error(tmp_path):
    with pytest.raises(DataError, match="manifest.json"):
        FeatureStore(tmp_path / "nothing")
    StoreWriter(tmp_path, MANIFEST).write_shard(_rows(1))
    with pytest.raises(DataError, match="incomplete"):
        FeatureStore(tmp_path)


def test_damaged_shard_names_the_file_and_the_fix(tmp_path):
    """Rows are views of a memory map of their shard: a truncated shard, a shard that is not safetensors
    and a feature the shard does not hold each give a DataError naming the shard file."""
    rows = _rows(3)
    w = StoreWriter(tmp_path, MANIFEST)
    w.write_shard(rows, _tensors(rows, 0))
    w.finalize()
    row = FeatureStore(tmp_path).rows[0]
    shard = tmp_path / "shards" / f"{row.shard}.safetensors"
    assert FeatureStore(tmp_path).hidden(row, "draft.h3").dtype == torch.bfloat16
    with pytest.raises(DataError, match=rf"{row.shard}\.safetensors.*no tensor 'draft\.h9'"):
        FeatureStore(tmp_path).hidden(row, "draft.h9")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 64])
    with pytest.raises(DataError, match=rf"{row.shard}\.safetensors.*truncated"):
        FeatureStore(tmp_path).hidden(row, "target.final")
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(DataError, match=rf"{row.shard}\.safetensors.*not a readable safetensors"):
        FeatureStore(tmp_path).hidden(row, "target.final")


def test_killed_writer_resumes_to_the_same_store(tmp_path):
    """kill -9 in the middle of writing shards; a rerun finishes with identical logical content."""
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(os.getcwd())!r})
        from tests.test_store import MANIFEST, _rows, _tensors
        from specalign.data.store import StoreWriter
        w = StoreWriter(sys.argv[1], MANIFEST)
        done = w.done_keys()
        for i in range(12):
            rows = [r for r in _rows(1, start=i) if f"{{r['sample_id']}}#0" not in done]
            if rows:
                w.write_shard(rows, _tensors(rows, i))
                if sys.argv[2] == "slow":
                    time.sleep(0.15)
        w.finalize()
    """)
    (tmp_path / "w.py").write_text(script)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    p = subprocess.Popen([sys.executable, str(tmp_path / "w.py"), str(killed), "slow"])
    import time
    deadline = time.time() + 30
    while time.time() < deadline and len(list((killed / "shards").glob("*.safetensors"))) < 4:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_before = len(list((killed / "shards").glob("*.safetensors")))
    assert 0 < n_before < 12
    subprocess.run([sys.executable, str(tmp_path / "w.py"), str(killed), "fast"], check=True)
    subprocess.run([sys.executable, str(tmp_path / "w.py"), str(clean), "fast"], check=True)
    a, b = FeatureStore(killed), FeatureStore(clean)
    assert [r.key for r in a.rows] == [r.key for r in b.rows]
    for ra, rb in zip(a.rows, b.rows):
        assert ra.target_tokens == rb.target_tokens
        for name in a.feature_names("target") + a.feature_names("draft"):
            assert torch.equal(a.hidden(ra, name), b.hidden(rb, name))
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (killed, clean))
    assert ma["counts"] == mb["counts"]
    assert not list(killed.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------- integrity

def _finished(root, n=4, seed=0):
    rows = _rows(n)
    w = StoreWriter(root, MANIFEST)
    w.write_shard(rows, _tensors(rows, seed))
    w.save_heads({"target.lm_head": torch.randn(50, 8)})
    w.finalize()
    return rows


def _set_bf16(shard, manifest_free: bool, value: float, name: str, element: int):
    """Overwrite one bf16 element of a shard's tensor `name` in place; optionally drop the manifest's
    checksums (a store written before them)."""
    from specalign.data.store import read_header

    header, _ = read_header(shard)
    start = json.loads(header)[name]["data_offsets"][0]
    data = bytearray(shard.read_bytes())
    at = 8 + len(header) + start + 2 * element
    data[at:at + 2] = torch.tensor([value], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    shard.write_bytes(bytes(data))
    if manifest_free:
        m = shard.parent.parent / "manifest.json"
        m.write_text(json.dumps({k: v for k, v in json.loads(m.read_text()).items() if k != "checksums"}))


def test_writer_refuses_non_finite_features_and_drop_nonfinite_skips_them(tmp_path):
    from specalign.data.store import drop_nonfinite

    rows = _rows(3)
    tens = _tensors(rows, 0)
    second = len(rows[0]["target_tokens"])            # first token of the second row
    tens["draft.h3"][second + 1, 5] = float("nan")
    tens["target.final"][0, 0] = float("inf")
    with pytest.raises(DataError, match=r"row s000#0: non-finite features: target.final holds NaN or inf at token 0"):
        StoreWriter(tmp_path / "a", MANIFEST).write_shard(rows, tens)
    kept, kept_tens, errors = drop_nonfinite(rows, tens)
    assert [r["sample_id"] for r in kept] == ["s002"]
    assert [(k, "draft.h3" in r or "target.final" in r) for k, r in errors] == [("s000#0", True), ("s001#0", True)]
    assert "draft.h3 holds NaN or inf at token 1" in errors[1][1]
    third = slice(second + len(rows[1]["target_tokens"]), None)
    assert all(torch.equal(kept_tens[k], tens[k][third]) for k in tens)
    w = StoreWriter(tmp_path / "b", MANIFEST)
    w.write_shard(kept, kept_tens)
    w.finalize()
    assert [r.key for r in FeatureStore(tmp_path / "b").rows] == ["s002#0"]


@pytest.mark.parametrize("with_checksums", [True, False])
def test_non_finite_value_in_a_shard_is_found_on_read(tmp_path, with_checksums, caplog):
    """A NaN that reached a shard after it was written: a checksum mismatch naming the shard, or, in a store
    from before checksums (which loads with a log line), the shard and the row that holds it."""
    _finished(tmp_path)
    store = FeatureStore(tmp_path)
    row = store.rows[1]
    shard = tmp_path / "shards" / f"{row.shard}.safetensors"
    _set_bf16(shard, not with_checksums, float("nan"), "draft.final", 8 * (row.offset + 1) + 3)  # row 1, token 1
    with caplog.at_level("WARNING"):
        store = FeatureStore(tmp_path)
    assert ("written before shard checksums" in caplog.text) != with_checksums
    message = "checksum mismatch: its tensor bytes changed" if with_checksums else rf"row {row.key}: draft.final holds NaN"
    with pytest.raises(DataError, match=rf"{row.shard}\.safetensors: {message}"):
        store.hidden(store.rows[0], "target.h2")         # any read of the shard verifies all of it


def test_bit_flips_in_shard_heads_and_row_table_are_named(tmp_path):
    _finished(tmp_path)
    store = FeatureStore(tmp_path)
    row = store.rows[0]
    shard = tmp_path / "shards" / f"{row.shard}.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01                                  # one bit of some feature value
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{row.shard}\.safetensors: checksum mismatch"):
        FeatureStore(tmp_path).hidden(row, "target.h3")
    heads = tmp_path / "heads.safetensors"
    data = bytearray(heads.read_bytes())
    data[-7] ^= 0x10
    heads.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"heads\.safetensors: checksum mismatch"):
        FeatureStore(tmp_path).heads()
    table = tmp_path / "rows.parquet"
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0x04
    table.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"rows\.parquet: checksum mismatch"):
        FeatureStore(tmp_path)


def test_truncated_heads_and_row_table_are_one_line_errors(tmp_path):
    _finished(tmp_path)
    heads, table = tmp_path / "heads.safetensors", tmp_path / "rows.parquet"
    heads.write_bytes(heads.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"heads\.safetensors: tensor 'target.lm_head' .* does not fit"):
        FeatureStore(tmp_path).heads()
    m = tmp_path / "manifest.json"
    m.write_text(json.dumps({k: v for k, v in json.loads(m.read_text()).items() if k != "checksums"}))
    table.write_bytes(table.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"rows\.parquet: unreadable row table .*truncated or damaged") as e:
        FeatureStore(tmp_path)
    assert "\n" not in str(e.value)


def test_verification_reads_each_shard_once_per_process(tmp_path, monkeypatch):
    import specalign.data.store as store_module

    _finished(tmp_path)
    calls = []
    scan = store_module.scan_tensors
    monkeypatch.setattr(store_module, "scan_tensors", lambda t: calls.append(1) or scan(t))
    for _ in range(3):                                   # e.g. a DataModule, a module and a dataset each open it
        s = FeatureStore(tmp_path)
        s.hidden(s.rows[0], "target.h2")
    assert len(calls) == 1
