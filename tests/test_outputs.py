"""A stage writes only into a new or empty directory or into its own earlier output of the same identity
(specalign.io.claim_output); anything else is refused before a byte is written, also before Hydra writes
its own records (specalign.stage.StageCheck)."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest_train import FAST, TINY_TOKEN_ADAPTER, make_store, train_config
from hydra import compose, initialize_config_dir
from specalign.data.import_pairs import import_pairs
from specalign.train.export import export_run
from specalign.train.train import main as train_main

from specalign.errors import OutputInUse
from specalign.io import MARKER, claim_file, claim_output
from specalign.paths import CONF_DIR

TOKEN_ADAPTER = [*TINY_TOKEN_ADAPTER, *FAST, "trainer.max_steps=2"]


def foreign(path):
    """A directory of the user's own files, with names a stage writes."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"mine": true}')
    (path / "model.safetensors").write_bytes(b"my weights")
    (path / "metrics.csv").write_text("a,b\n1,2\n")
    return path


def snapshot(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} | {
        p.relative_to(path).as_posix(): None for p in sorted(path.rglob("*")) if p.is_dir()}


def config(stage, *overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(stage, overrides=list(overrides))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("store") / "tokens", n_train=8, kind="tokens")


@pytest.fixture(scope="module")
def run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ta"
    train_main.run(train_config(store, out, *TOKEN_ADAPTER))
    return out


def test_claim_rules(tmp_path):
    out = claim_output(tmp_path / "new", "export", {"run": "r1"})
    assert json.loads((out / MARKER).read_text())["stage"] == "export"
    claim_output(out, "export", {"run": "r1"})                        # its own output again: a rerun
    with pytest.raises(OutputInUse, match=r"another identity: run: it has \"r1\", this run has \"r2\""):
        claim_output(out, "export", {"run": "r2"})
    with pytest.raises(OutputInUse, match=r"holds the output of `specalign export`, not of `specalign evaluate`"):
        claim_output(out, "evaluate")
    hydra_only = tmp_path / "hydra_only"
    (hydra_only / ".hydra").mkdir(parents=True)
    (hydra_only / "stage_main.log").write_text("")
    claim_output(hydra_only, "train")                                 # Hydra's own records are not in the way
    with pytest.raises(OutputInUse, match=r"not empty and not written by `specalign train` \(config.json, "
                                          r"metrics.csv, model.safetensors\)"):
        claim_output(foreign(tmp_path / "user"), "train")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputInUse, match="must be a directory"):
        claim_output(tmp_path / "file", "train")


def test_train_export_evaluate_refuse_a_foreign_directory(store, run, tmp_path):
    from specalign.specdec.evaluate import main as evaluate_main

    user = foreign(tmp_path / "user")
    before = snapshot(user)
    with pytest.raises(OutputInUse, match="not written by `specalign train`"):
        train_main.run(train_config(store, user, *TOKEN_ADAPTER))
    with pytest.raises(OutputInUse, match="not written by `specalign export`"):
        export_run(run, user)
    with pytest.raises(OutputInUse, match="not written by `specalign evaluate`"):
        evaluate_main.run(config("evaluate", f"store={store}", "split=all", "gamma=3", f"out={user}"))
    assert snapshot(user) == before


def test_a_stage_reruns_into_its_own_output_but_not_into_another_stages(store, run, tmp_path):
    from specalign.specdec.evaluate import main as evaluate_main

    export_run(run, tmp_path / "drafter")
    export_run(run, tmp_path / "drafter")                               # the same run again
    with pytest.raises(OutputInUse, match=r"another identity: ckpt: it has \"best\", this run has \"last\""):
        export_run(run, tmp_path / "drafter", ckpt="last")
    report = config("evaluate", f"store={store}", f"drafter={tmp_path / 'drafter'}", "split=all", "gamma=3",
                    f"out={tmp_path / 'report'}")
    evaluate_main.run(report)
    evaluate_main.run(report)
    with pytest.raises(OutputInUse, match="holds the output of `specalign evaluate`, not of `specalign export`"):
        export_run(run, tmp_path / "report")


def test_extract_refuses_a_directory_with_foreign_heads(tmp_path):
    from specalign.data.synth import synthesize
    from specalign.train.extract import extract

    world = synthesize(tmp_path / "world", clips=1, seed=3, durations=("1s",))["1s"]
    out = tmp_path / "store"
    out.mkdir()
    (out / "heads.safetensors").write_bytes(b"someone else's heads")
    with pytest.raises(OutputInUse, match=r"not written by `specalign extract` \(heads.safetensors\)"):
        extract(config("extract", f"data.root={world}", f"out={out}", "max_new_tokens=2", "trainer.accelerator=cpu"))
    assert sorted(p.name for p in out.iterdir()) == ["heads.safetensors"]


def test_import_pairs_synth_and_plot_refuse_foreign_outputs(run, tmp_path):
    from specalign.data.synth_stage import main as synth_main
    from specalign.train.plot import main as plot_main

    src = tmp_path / "pairs.json"
    src.write_text(json.dumps({"results": [{"sample_id": "a", "query": "q", "vl_tokens": [3, 4],
                                            "egpt_tokens": [3]}]}))
    user = foreign(tmp_path / "user")
    before = snapshot(user)
    with pytest.raises(OutputInUse, match="not written by `specalign import-pairs`"):
        import_pairs(src, user)
    with pytest.raises(OutputInUse, match="not written by `specalign synth`"):
        synth_main.run(config("synth", f"out={user}", "clips=1", "workers=1"))
    with pytest.raises(OutputInUse, match="exists and was not written by specalign"):
        plot_main.run(config("plot", f"runs=[{run}]", f"out={user / 'config.json'}"))
    assert snapshot(user) == before
    png = tmp_path / "curves.png"
    plot_main.run(config("plot", f"runs=[{run}]", f"out={png}"))
    assert claim_file(png, "plot") == png                              # its own plot may be redrawn


def test_cli_refuses_before_hydra_writes_its_records(store, tmp_path, stage="train"):
    """Hydra makes the run directory (train's is out/) and writes its config and log there before the stage
    runs: the check runs first, so the user's directory gains nothing."""
    user = foreign(tmp_path / "user")
    before = snapshot(user)
    result = subprocess.run(["specalign", stage, f"store={store}", f"out={user}"]
                            + (TOKEN_ADAPTER if stage == "train" else ["split=all"]),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [(f"error: {user}: not empty and not written by `specalign {stage}` (config.json, metrics.csv, "
                       "model.safetensors); a stage writes only into a new or empty directory or its own earlier "
                       "output: choose another out=")]
    assert snapshot(user) == before
