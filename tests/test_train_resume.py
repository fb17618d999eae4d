"""A killed and resumed `specalign train` ends exactly where an uninterrupted run ends, with the defaults
(`trainer.max_steps=-1`, the scheduler's horizon from the epochs): the same final weights, and the same
best.ckpt (weights and score). 10 train rows in batches of 4: 3 steps per epoch, 3 epochs, validation
after each epoch, last.ckpt after every step (`checkpoint_every_n_steps=1`)."""

import os
import subprocess
import sys
import textwrap

import pytest
import specalign.train.train as train_stage
import torch
from conftest_train import TINY_TOKEN_ADAPTER, make_store, train_config
from specalign.train.export import load_checkpoint

RUN = [*TINY_TOKEN_ADAPTER, "adapter.dropout=0.1", "adapter.draft_dropout=0.5", "trainer.max_epochs=3",
       "trainer.enable_progress_bar=false", "val.max_rows=3", "val.gamma=3", "checkpoint_every_n_steps=1"]


class Killed(Exception):
    """Stands for kill -9: raised right after a checkpoint is written, nothing else runs after it."""


def killing_save_last(hook: str, step: int) -> type:
    """SaveLast that dies right after its `hook` ran at optimizer step `step`."""

    class KillingSaveLast(train_stage.SaveLast):
        def on_train_batch_end(self, trainer, *args):
            super().on_train_batch_end(trainer, *args)
            if hook == "on_train_batch_end" and trainer.global_step == step:
                raise Killed

        def on_validation_end(self, trainer, pl_module):
            super().on_validation_end(trainer, pl_module)
            if hook == "on_validation_end" and trainer.global_step == step:
                raise Killed

    return KillingSaveLast


def best_score(ckpt: dict) -> float:
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")]
    return float(state["best_model_score"])


def assert_same_run(run, reference) -> None:
    for name in ("last", "best"):
        got, want = load_checkpoint(run, name), load_checkpoint(reference, name)
        assert got["global_step"] == want["global_step"], name
        assert best_score(got) == best_score(want), name
        assert got["state_dict"].keys() == want["state_dict"].keys()
        for k, v in want["state_dict"].items():
            assert torch.equal(got["state_dict"][k], v), f"{name}: {k}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "s", n_train=10, kind="tokens")


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "full"
    train_stage.train(train_config(store, run, *RUN))
    assert load_checkpoint(run, "last")["global_step"] == 9
    return run


@pytest.mark.parametrize("hook,step", [
    ("on_train_batch_end", 1),      # epoch 0, mid-epoch
    ("on_train_batch_end", 4),      # epoch 1, mid-epoch
    ("on_train_batch_end", 6),      # right after epoch 1's last step, before its validation
    ("on_validation_end", 6),       # right after epoch 1's validation (best.ckpt and last.ckpt written)
    ("on_train_batch_end", 8),      # epoch 2, one step before the end
])
def test_killed_then_resumed_run_equals_the_uninterrupted_one(store, uninterrupted, tmp_path, monkeypatch,
                                                              hook, step):
    monkeypatch.setattr(train_stage, "write_outputs", lambda run: None)     # curves.png: not compared
    with monkeypatch.context() as m:
        m.setattr(train_stage, "SaveLast", killing_save_last(hook, step))
        with pytest.raises(Killed):
            train_stage.train(train_config(store, tmp_path, *RUN))
    assert load_checkpoint(tmp_path, "last")["global_step"] <= step
    train_stage.train(train_config(store, tmp_path, *RUN, "resume=true"))
    assert_same_run(tmp_path, uninterrupted)


KILL_SCRIPT = """
import os, signal, sys
import specalign.train.train as train_stage

class KillAfterSave(train_stage.SaveLast):
    def _save(self, trainer):
        super()._save(trainer)
        if trainer.global_step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)

train_stage.SaveLast = KillAfterSave
sys.argv = [sys.argv[0], *{args!r}]
train_stage.main()
"""


def test_kill_9_mid_epoch_then_resume(store, uninterrupted, tmp_path, monkeypatch):
    """A real SIGKILL of `specalign train` in the middle of the last epoch (step 7 of 9), then resume=true."""
    args = [f"store={store}", f"out={tmp_path}", *RUN]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}        # the in-process reference runs on one thread
    script = textwrap.dedent(KILL_SCRIPT).format(step=7, args=args)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert load_checkpoint(tmp_path, "last")["global_step"] == 7
    monkeypatch.setattr(train_stage, "write_outputs", lambda run: None)
    train_stage.train(train_config(store, tmp_path, *RUN, "resume=true"))
    assert_same_run(tmp_path, uninterrupted)
