"""What stops a training run, and how: a non-finite loss (a damaged store, or divergence) with the step
and the rows; a checkpoint that cannot be written (full disk, read-only output) with one line naming the
file, the previous checkpoints left whole."""

import os
import resource
import signal
import subprocess
import sys

import pytest
import specalign.train.train as train_stage
import torch
from conftest_train import FAST, TINY_EAGLE3, TINY_TOKEN_ADAPTER, make_store, train_config
from specalign.data.store import FeatureStore

from specalign.errors import DataError, SpecalignError


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {"tokens": make_store(root / "tokens", n_train=10, kind="tokens"),
            "full": make_store(root / "full", n_train=6)}


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    monkeypatch.setattr(train_stage, "write_outputs", lambda run: None)


def test_nonfinite_features_stop_training_naming_the_step_and_rows(stores, tmp_path, monkeypatch):
    """A NaN in one row's features, as read (a store written before checks, or damaged since): the run
    stops at the first step whose batch holds that row, before the weights see it."""
    hidden = FeatureStore.hidden

    def damaged(self, row, name):
        x = hidden(self, row, name)
        return torch.full_like(x, float("nan")) if row.sample_id == "s03" and name == "target.h2" else x

    monkeypatch.setattr(FeatureStore, "hidden", damaged)
    with pytest.raises(DataError, match=r"training step \d+ \(epoch 0\): the loss is nan: non-finite features in "
                                        r"train rows s03#0 \(extract these samples again\)"):
        train_stage.train(train_config(stores["full"], tmp_path, *TINY_EAGLE3, *FAST))


def test_divergence_stops_training_naming_the_step_and_rows(stores, tmp_path):
    with pytest.raises(SpecalignError, match=r"training step 1 \(epoch 0\): the loss is nan on train rows "
                                             r"(s\d\d#0, ){3}s\d\d#0, whose inputs are finite: training diverged"):
        train_stage.train(train_config(stores["tokens"], tmp_path, *TINY_TOKEN_ADAPTER, *FAST,
                                       "adapter.lr=1e30", "adapter.warmup_steps=0"))


def train_cli(store, out, *args, **kw):
    return subprocess.run(["specalign", "train", f"store={store}", f"out={out}", *TINY_TOKEN_ADAPTER,
                           "trainer.enable_progress_bar=false", "val.max_rows=3", "checkpoint_every_n_steps=1",
                           *args], capture_output=True, text=True, check=False, **kw)


def test_a_checkpoint_write_that_fails_leaves_the_previous_ones_whole(stores, tmp_path):
    """The resumed run may write no file larger than half a checkpoint (RLIMIT_FSIZE: the write fails
    part way, as on a full disk): its first last.ckpt fails; best.ckpt and last.ckpt stay as they were."""
    run = tmp_path / "run"
    first = train_cli(stores["tokens"], run, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-2000:]
    ckpts = run / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpts.iterdir()}
    assert set(before) == {"best.ckpt", "last.ckpt"}
    limit = len(before["last.ckpt"]) // 2

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    resumed = train_cli(stores["tokens"], run, "trainer.max_epochs=2", "resume=true", preexec_fn=small_disk)
    assert resumed.returncode == 2
    assert resumed.stderr.splitlines()[-1] == f"error: {ckpts / 'last.ckpt'}: File too large"
    assert "Traceback" not in resumed.stderr
    assert {p.name: p.read_bytes() for p in ckpts.iterdir()} == before          # no temp file left either


def make_read_only(path) -> None:
    """chmod for a normal user; root writes through that, so an immutable directory (chattr) instead."""
    if os.geteuid() != 0:
        path.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False).returncode != 0:
        pytest.skip("running as root without chattr: no way to make a read-only directory")
    if os.access(path, os.W_OK) and os.geteuid() != 0:
        pytest.skip("the directory stays writable")


def make_writable(path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)
    path.chmod(0o755)


def test_a_read_only_output_is_one_line(stores, tmp_path):
    parent = tmp_path / "read_only"
    parent.mkdir()
    make_read_only(parent)
    try:
        out = train_cli(stores["tokens"], parent / "run", "trainer.max_steps=1")
    finally:
        make_writable(parent)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"error: {parent / 'run'}: ") and out.stderr.count("\n") == 1, out.stderr
    assert list(parent.iterdir()) == []


WRITE_SCRIPT = """
import resource, signal, sys, torch
from safetensors.torch import save_file
from specalign.io import atomic_path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
writers = {"bytes": lambda tmp: tmp.write_bytes(bytes(100_000)),
           "safetensors": lambda tmp: save_file({"x": torch.zeros(100_000)}, str(tmp))}
try:
    with atomic_path(sys.argv[2]) as tmp:
        writers[sys.argv[1]](tmp)
except OSError as e:
    print(e.errno, e.filename)
"""


@pytest.mark.parametrize("writer", ["bytes", "safetensors"])
def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, writer):
    """Every output goes through io.atomic_path: a write that fails part way (here past RLIMIT_FSIZE; a
    full disk alike) leaves the old file, no temp file, and an OSError naming the file."""
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    out = subprocess.run([sys.executable, "-c", WRITE_SCRIPT, writer, str(target)], capture_output=True, text=True,
                         check=False)
    assert out.stdout.split() == ["27", str(target)], out.stderr[-2000:]      # EFBIG
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
