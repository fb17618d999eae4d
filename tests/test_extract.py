"""`specalign extract` on the tiny pair and a small synthetic world: position alignment of the stored rows
(THE alignment test), resume after kill -9, bad samples and systematic failures, refused mismatches,
two DDP ranks (gloo) writing one store, the progress bar's samples/s."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from specalign.data.dsec import load_dataset
from specalign.data.features import is_context
from specalign.data.samples import Request, requests_of
from specalign.data.store import FeatureStore
from specalign.data.synth import synthesize
from specalign.train.extract import ExtractionModule, extract
from specalign.train.extract import main as extract_main
from specalign.vlms.alignment import prompt_row_position, video_summary
from specalign.vlms.registry import build_backends

from specalign.errors import StoreMismatch, SystematicFailure
from specalign.paths import CONF_DIR, REPO_ROOT

# 2 clips x 6 questions = 12 requests in 6 batches; fixed-length responses so that runs last long enough
RUN = ["batch_size=2", "max_new_tokens=24", "ignore_eos=true", "trainer.accelerator=cpu"]
N_REQUESTS, QUESTIONS_PER_CLIP = 12, 6
SPECALIGN = [sys.executable, "-c", "from specalign.cli import main; main()"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("world"), clips=2, seed=1, durations=("1s",))["1s"]


def cli(dataset: Path, out: Path, *overrides: str, env: dict | None = None, wait: bool = True):
    """`specalign extract` as a subprocess (Popen when not `wait`)."""
    cmd = [*SPECALIGN, "extract", f"data.root={dataset}", f"out={out}", *RUN, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, check=False, env=env, cwd=out.parent, capture_output=True, text=True, timeout=300)


def config(dataset: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("extract", overrides=[f"data.root={dataset}", f"out={out}", *RUN, *overrides])


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> tuple[FeatureStore, str]:
    """An uninterrupted single-process run: the store and the run's console output (Lightning's bar
    writes to stdout)."""
    out = tmp_path_factory.mktemp("reference") / "store"
    run = cli(dataset, out)
    assert run.returncode == 0, run.stderr[-3000:]
    return FeatureStore(out), run.stdout


def assert_same_store(a: FeatureStore, b: FeatureStore) -> None:
    """Same rows, features and manifest; the checksums describe the shard files, which DDP lays out otherwise."""
    assert [r.key for r in a.rows] == [r.key for r in b.rows]
    assert {**a.manifest, "checksums": None} == {**b.manifest, "checksums": None}
    for ra, rb in zip(a.rows, b.rows):
        assert (ra.target_tokens, ra.draft_tokens, ra.split) == (rb.target_tokens, rb.draft_tokens, rb.split)
        for name in a.feature_names("target") + a.feature_names("draft"):
            assert torch.equal(a.hidden(ra, name), b.hidden(rb, name)), (ra.key, name)
    ha, hb = a.heads(), b.heads()
    assert ha.keys() == hb.keys() and all(torch.equal(ha[k], hb[k]) for k in ha)


def request_of(store: FeatureStore, row) -> Request:
    samples, _ = load_dataset(store.manifest["data"]["root"])
    sample = next(s for s in samples if s.id == row.sample_id)
    return Request(sample, row.question_id, row.question)


# ------------------------------------------------------------------------------------------- alignment

def test_target_rows_predict_the_stored_tokens_through_the_stored_head(reference):
    store, _ = reference
    assert len(store) == N_REQUESTS and store.manifest["counts"]["rows"] == N_REQUESTS
    head = store.heads()["target.lm_head"]
    for row in store.rows:
        logits = store.hidden(row, "target.final").float() @ head.T
        assert logits.argmax(-1).tolist() == row.target_tokens, row.key


def test_draft_rows_line_up_one_to_one_with_target_rows(reference):
    store, _ = reference
    for shard in sorted({r.shard for r in store.rows}):
        n_rows = sum(len(r.target_tokens) for r in store.rows if r.shard == shard)
        with safe_open(str(store.root / "shards" / f"{shard}.safetensors"), framework="pt") as f:
            shapes = {name: f.get_slice(name).get_shape()[0] for name in f.keys()}  # noqa: SIM118
        context = {name: shapes.pop(name) for name in list(shapes) if is_context(name)}
        assert set(shapes) == set(store.feature_names("target") + store.feature_names("draft"))
        assert set(shapes.values()) == {n_rows}, (shard, shapes)
        n_requests = sum(r.shard == shard for r in store.rows)                # the prompt context: per request
        assert {k: v // n_requests for k, v in context.items()} == {
            "prompt.token": 1, **{f"prompt.{n}": 1 for n in store.context_spec["features"]},
            **{f"video.{n}": store.context_spec["video_rows"] for n in store.context_spec["features"]}}


def test_prompt_context_equals_a_fresh_prefill(reference):
    """The stored prompt context of a request recomputed alone: the prompt row and last token, the video
    summary pooled per frame (vlms/alignment.py) from one prefill of the target."""
    store, _ = reference
    assert store.manifest["format_version"] == 2
    models = config(store.manifest["data"]["root"], store.root).models
    target, _ = build_backends(models, "cpu")
    spec = store.context_spec
    for row in (store.rows[0], store.rows[-1]):
        batch = target.prepare([request_of(store, row)])
        ids = batch.inputs["input_ids"][0]
        with torch.no_grad():
            hidden = target.model(**batch.inputs, output_hidden_states=True).hidden_states
        assert store.context(row, "prompt.token").tolist() == [int(ids[-1])]
        for name in spec["features"]:
            h = hidden[int(name.split(".h")[1])][0]
            video = video_summary(h, ids, spec["video_token_id"], spec["video_rows"])
            for kind, fresh in (("prompt", h[prompt_row_position(len(ids))][None]), ("video", video)):
                stored = store.context(row, f"{kind}.{name}").float()
                torch.testing.assert_close(stored, fresh.bfloat16().float(), rtol=2e-2, atol=2e-2)


def test_stored_rows_equal_a_fresh_teacher_forced_pass(reference):
    """Rows of both models recomputed alone (batch of one) from the stored target tokens."""
    store, _ = reference
    models = config(store.manifest["data"]["root"], store.root).models
    target, draft = build_backends(models, "cpu")
    for row in (store.rows[0], store.rows[-1]):  # one of each clip
        request = request_of(store, row)
        for role, backend in (("target", target), ("draft", draft)):
            fresh = backend.teacher_forced(backend.prepare([request]), [row.target_tokens], backend.capture_layers())
            for name in [f"h{i}" for i in backend.capture_layers()] + ["final"]:
                stored = store.hidden(row, f"{role}.{name}").float()
                torch.testing.assert_close(stored, fresh[name][0].to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2)


def test_run_reads_each_prompt_once_and_keeps_the_teacher_forced_rows(dataset, monkeypatch):
    """`ExtractionModule.run` stores the separate passes' tokens and rows (up to bf16 rounding) with one
    forward over each model's prompt: target rows captured while decoding, the draft's teacher-forced rows
    on its cached prompt."""
    target, draft = build_backends({"tiny": True, "quant": "fp32"}, "cpu")
    requests = requests_of(load_dataset(dataset)[0])[1:5]
    batches = {b.role: b.prepare(requests) for b in (target, draft)}
    responses = {b.role: b.generate(batches[b.role], 24) for b in (target, draft)}
    expected = {}
    for b in (target, draft):
        out = b.teacher_forced(batches[b.role], responses["target"], b.capture_layers())
        expected |= {f"{b.role}.{name}": torch.cat(rows) for name, rows in out.items()}

    widths = {"target": [], "draft": []}  # the sequence length of every forward through each decoder
    for b in (target, draft):
        b.decoder.layers[0].register_forward_pre_hook(lambda m, args, role=b.role: widths[role].append(args[0].shape[1]))
        monkeypatch.setattr(b, "teacher_forced", None)  # not called
    rows, feats = ExtractionModule(target, draft, 24).run(requests)
    assert [r["target_tokens"] for r in rows] == responses["target"]
    assert [r["draft_tokens"] for r in rows] == responses["draft"]
    feats = {k: v for k, v in feats.items() if not is_context(k)}             # the prompt context: its own test
    assert feats.keys() == expected.keys()
    for name, rows_ in expected.items():
        torch.testing.assert_close(feats[name].float(), rows_.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-4)
    for role, batch in batches.items():
        assert sum(w >= min(batch.prompt_lens) for w in widths[role]) == 1, (role, widths[role])


# ---------------------------------------------------------------------------------------------- resume

def test_killed_run_resumes_to_the_uninterrupted_store(dataset, reference, tmp_path):
    out = tmp_path / "store"
    proc = cli(dataset, out, wait=False)
    shards = out / "shards"
    deadline = time.monotonic() + 120
    while not list(shards.glob("*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = list(shards.glob("*.safetensors"))
    assert 1 <= len(written) < N_REQUESTS // 2 and not (out / "rows.parquet").exists(), "killed too late"
    (shards / f".r00-{len(written):06d}.safetensors.x1y2.tmp").write_bytes(b"half a shard")  # killed mid-write

    run = cli(dataset, out, "input_threads=0")        # inputs prepared inline: the same store as prefetched
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_store(FeatureStore(out), reference[0])
    assert FeatureStore(out).manifest["checksums"] == reference[0].manifest["checksums"]   # the same files
    assert not list(out.rglob("*.tmp"))


# ----------------------------------------------------------------------------------------- bad samples

def clip_ids(root: Path) -> list[str]:
    return [s.id for s in load_dataset(root)[0]]


def corrupt_copy(dataset: Path, dest: Path, clips: list[int]) -> Path:
    root = dest / dataset.name
    shutil.copytree(dataset, root)
    videos = sorted((root / "mp4").rglob("*.mp4"))
    for i in clips:
        videos[i].write_bytes(os.urandom(4000))
    return root


def test_a_bad_clip_is_skipped_and_recorded(dataset, tmp_path):
    root = corrupt_copy(dataset, tmp_path, clips=[1])
    store = FeatureStore(extract(config(root, tmp_path / "store")))
    bad, (good_id, bad_id) = sorted((root / "mp4").rglob("*.mp4"))[1], clip_ids(root)
    assert len(store) == QUESTIONS_PER_CLIP and {r.sample_id for r in store.rows} == {good_id}
    errors = store.errors()
    assert sorted(e["key"] for e in errors) == [f"{bad_id}#{q}" for q in range(QUESTIONS_PER_CLIP)]
    assert all(str(bad) in e["reason"] for e in errors)
    assert store.manifest["counts"]["errors"] == QUESTIONS_PER_CLIP


def test_clip_with_invalid_events_is_skipped_per_request_with_the_file(dataset, tmp_path, capsys):
    """Clip 1's raw events hold y = 70000 (its event frames are fine): its requests are skipped and recorded,
    each with the event file and the reason, and the console's totals add up."""
    root = corrupt_copy(dataset, tmp_path, clips=[])
    events = sorted((root / "event_npy").rglob("*.npy"))[1]
    record = np.load(events, allow_pickle=True).item()
    record["y"] = record["y"].astype(np.int64)
    record["y"][5] = 70_000
    holder = np.empty((), dtype=object)
    holder[()] = record
    np.save(events, holder, allow_pickle=True)
    extract_main.run(config(root, tmp_path / "store", "max_new_tokens=4"))
    good_id, bad_id = clip_ids(root)
    store = FeatureStore(tmp_path / "store")
    assert {r.sample_id for r in store.rows} == {good_id}
    errors = store.errors()
    assert sorted(e["key"] for e in errors) == [f"{bad_id}#{q}" for q in range(QUESTIONS_PER_CLIP)]
    assert all(e["path"] == str(events) and "y = 70000 at event 5 is outside the sensor" in e["reason"]
               for e in errors)
    assert f"{N_REQUESTS} requests, {QUESTIONS_PER_CLIP} written, {QUESTIONS_PER_CLIP} skipped" in capsys.readouterr().out


def test_unreadable_clip_is_recorded_once_per_request(dataset, tmp_path):
    """A clip whose video is missing never reaches the models: one error line per (clip, question) request,
    not one per clip, so that written + skipped = requested."""
    root = corrupt_copy(dataset, tmp_path, clips=[])
    video = sorted((root / "mp4").rglob("*.mp4"))[1]
    video.unlink()
    store = FeatureStore(extract(config(root, tmp_path / "store", "max_new_tokens=4")))
    errors = store.errors()
    assert len(errors) == QUESTIONS_PER_CLIP and {e["path"] for e in errors} == {str(video)}
    c = store.manifest["counts"]
    assert (c["rows"], c["errors"]) == (QUESTIONS_PER_CLIP, QUESTIONS_PER_CLIP)


def test_rows_with_non_finite_features_are_skipped_and_recorded(dataset):
    """A request whose captured features hold NaN (here injected into the model's output) is recorded as
    skipped with the reason; the batch's other requests are written."""
    target, draft = build_backends({"tiny": True, "quant": "fp32"}, "cpu")
    module = ExtractionModule(target, draft, 4)
    requests = requests_of(load_dataset(dataset)[0])[:3]
    real_run = module.run

    def run_with_a_nan(batch, inputs=None):
        rows, feats = real_run(batch, inputs)
        start = sum(len(r["target_tokens"]) for r in rows[:1])       # first token of the second request
        with torch.inference_mode():                                 # the features are inference tensors
            feats["target.h4"][start + 1, 0] = float("nan")
        return rows, feats

    module.run = run_with_a_nan
    out = module.predict_step(requests, 0)
    assert [r["question_id"] for r in out["rows"]] == [requests[0].question_id, requests[2].question_id]
    (key, reason, path), = out["errors"]
    assert key == requests[1].key and path is None
    assert reason == "non-finite features: target.h4 holds NaN or inf at token 1"
    n = sum(len(r["target_tokens"]) for r in out["rows"])
    tensors = {k: t for k, t in out["tensors"].items() if not is_context(k)}
    assert all(t.shape[0] == n and torch.isfinite(t.float()).all() for t in tensors.values())
    assert out["tensors"]["prompt.token"].shape == (2,)                    # the prompt context: 2 requests kept


def test_fail_fast_after_counts_failures_before_the_first_success(dataset, tmp_path):
    """Clip 0 is bad: its 6 requests (3 batches) fail before clip 1 succeeds. fail_fast_after=6 stops the
    run and records nothing (a fixed rerun retries them); 7 lets it reach clip 1 and finish."""
    root = corrupt_copy(dataset, tmp_path, clips=[0])
    out = tmp_path / "store"
    with pytest.raises(SystematicFailure, match="first 6 requests all failed.*000000.mp4"):
        extract(config(root, out, "fail_fast_after=6"))
    assert not (out / "errors.jsonl").exists() and not list((out / "shards").iterdir())
    store = FeatureStore(extract(config(root, out, "fail_fast_after=7")))
    assert {r.sample_id for r in store.rows} == {clip_ids(root)[1]}
    assert len(store.errors()) == QUESTIONS_PER_CLIP


def test_systematic_failure_stops_with_the_first_error(dataset, tmp_path):
    """Every video is bad: fewer failures than fail_fast_after, but no request ever succeeded."""
    root = corrupt_copy(dataset, tmp_path, clips=[0, 1])
    out = tmp_path / "store"
    run = cli(root, out)
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "requests all failed" in errors[0]
    assert f"{clip_ids(root)[0]}#0" in errors[0] and "000000.mp4" in errors[0]
    assert "Traceback" not in run.stderr
    assert not (out / "rows.parquet").exists() and not (out / "errors.jsonl").exists()


# ------------------------------------------------------------------------------------------ mismatches

def test_consumer_expecting_other_layers_is_refused(reference):
    store, _ = reference
    FeatureStore(store.root, expect={"layers": store.manifest["layers"]})
    with pytest.raises(StoreMismatch, match=r"layers.target: expected \[2, 16, 29\]"):
        FeatureStore(store.root, expect={"layers": {"target": [2, 16, 29]}})


def test_extract_into_a_store_of_other_models_is_refused(reference, tmp_path):
    """The tiny pair's architecture (config hash) does not depend on its seed: the seed is recorded."""
    store, _ = reference
    assert store.manifest["target"]["seed"] == 0
    with pytest.raises(StoreMismatch, match=r"target.weights: .*target.seed: this run has 1, store has 0.*choose another"):
        extract(config(store.manifest["data"]["root"], store.root, "models.seed=1"))
    with pytest.raises(StoreMismatch, match=r'target.quant: this run has "bf16", store has "fp32"'):
        extract(config(store.manifest["data"]["root"], store.root, "models.quant=bf16"))
    assert FeatureStore(store.root).manifest["status"] == "complete"


# ------------------------------------------------------------------------------------------------- DDP

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_ranks_write_one_store_equal_to_a_single_process_run(dataset, reference, tmp_path):
    out = tmp_path / "store"
    run = cli(dataset, out, "trainer.devices=2", "trainer.strategy=ddp",
              env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("feature store") == 1  # rank 0 reports
    store = FeatureStore(out)
    assert {r.shard[:3] for r in store.rows} == {"r00", "r01"}
    assert len({r.key for r in store.rows}) == len(store) == N_REQUESTS
    assert_same_store(store, reference[0])


# ------------------------------------------------------------------------------------------ progress bar

def test_progress_bar_shows_samples_per_second(reference):
    _, console = reference
    assert "samples/s=" in console
