"""`specalign train | export | plot` on tiny stores: run outputs, multirun, resume, export round trip."""

import csv
import json
import subprocess

import pytest
import torch
from conftest_train import FAST, TINY_EAGLE3, TINY_TOKEN_ADAPTER, make_store, train_config
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from specalign.adapters.eagle3 import PromptRows
from specalign.adapters.export_format import load_drafter
from specalign.train.export import drafter_from_checkpoint, export_run, load_checkpoint
from specalign.train.train import main as train_main

from specalign.errors import DataError, SpecalignError
from specalign.paths import CONF_DIR

TOKEN_ADAPTER = [*TINY_TOKEN_ADAPTER, *FAST]
EAGLE3 = [*TINY_EAGLE3, *FAST]


def specalign(*args):
    out = subprocess.run(["specalign", *map(str, args)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def columns(run):
    with open(run / "metrics.csv", newline="") as f:
        return next(csv.reader(f))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {"tokens": make_store(root / "tokens", n_train=10, kind="tokens"),
            "full": make_store(root / "full", n_train=6)}


@pytest.fixture(scope="module")
def token_run(stores, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "token_adapter"
    specalign("train", f"store={stores['tokens']}", f"out={run}", *TOKEN_ADAPTER)
    return run


@pytest.fixture(scope="module")
def eagle3_run(stores, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "eagle3"
    score = train_main.run(train_config(stores["full"], run, *EAGLE3))
    assert score >= 1.0                     # the best val/tau
    return run


def test_cli_run_writes_metrics_curves_config_and_checkpoints(token_run):
    for name in ("metrics.csv", "curves.png", "config.yaml", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                 ".hydra/config.yaml"):
        assert (token_run / name).exists(), name
    assert {"step", "epoch", "train/loss_step", "train/top1_step", "train/top5_step", "train/loss_epoch",
            "val/loss", "val/top1", "val/top5", "val/tau", "val/alpha"} <= set(columns(token_run))
    assert load_checkpoint(token_run, "last")["global_step"] == 6


def test_eagle3_run_logs_accuracy_per_unroll_step(eagle3_run):
    cols = set(columns(eagle3_run))
    assert {f"val/acc_{k}" for k in range(3)} <= cols and "train/acc_2_step" in cols and "val/tau" in cols


def test_multirun_gives_each_job_its_own_run(stores, tmp_path):
    specalign("train", "-m", "adapter.lr=1e-3,3e-3", f"store={stores['tokens']}", f"out={tmp_path}",
              *TOKEN_ADAPTER, "trainer.max_steps=3")
    for job, lr in ((0, 1e-3), (1, 3e-3)):
        assert (tmp_path / str(job) / "metrics.csv").exists()
        assert load_checkpoint(tmp_path / str(job), "last")["hyper_parameters"]["optimizer"]["lr"] == lr


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(stores, tmp_path):
    """10 train rows, batch 4: 3 batches per epoch, so the kill after 4 steps is mid-epoch."""
    common = [*TOKEN_ADAPTER, "adapter.dropout=0.1", "adapter.draft_dropout=0.5", "scheduler.total_steps=8"]
    train_main.run(train_config(stores["tokens"], tmp_path / "full", *common, "trainer.max_steps=8"))
    train_main.run(train_config(stores["tokens"], tmp_path / "cut", *common, "trainer.max_steps=4"))
    assert load_checkpoint(tmp_path / "cut", "last")["global_step"] == 4
    with pytest.raises(DataError, match="resume=true"):
        train_main.run(train_config(stores["tokens"], tmp_path / "cut", *common, "trainer.max_steps=8"))
    train_main.run(train_config(stores["tokens"], tmp_path / "cut", *common, "trainer.max_steps=8",
                                "resume=true"))
    full, cut = load_checkpoint(tmp_path / "full", "last"), load_checkpoint(tmp_path / "cut", "last")
    assert cut["global_step"] == 8
    for k, v in full["state_dict"].items():
        assert torch.equal(v, cut["state_dict"][k]), k
    with open(tmp_path / "cut" / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert max(steps) >= 7 and (tmp_path / "cut" / "logs" / "version_1").exists()


def test_resume_without_a_checkpoint_is_a_clear_error(stores, tmp_path):
    with pytest.raises(DataError, match="nothing to resume"):
        train_main.run(train_config(stores["tokens"], tmp_path, *TOKEN_ADAPTER, "resume=true"))


@pytest.mark.parametrize("split", ["train_split=test", "val_split=test"])
def test_training_never_touches_the_test_split(stores, tmp_path, split):
    with pytest.raises(SpecalignError, match="test split"):
        train_main.run(train_config(stores["tokens"], tmp_path, *TOKEN_ADAPTER, split))


def test_eagle3_needs_hidden_states(stores, tmp_path):
    with pytest.raises(DataError, match="tokens-only"):
        train_main.run(train_config(stores["tokens"], tmp_path, *EAGLE3))


def test_export_round_trip_gives_the_same_logits(token_run, eagle3_run, tmp_path):
    g = torch.Generator().manual_seed(0)
    trained = drafter_from_checkpoint(load_checkpoint(token_run))
    specalign("export", f"run={token_run}", f"out={tmp_path / 'ta'}")
    loaded = load_drafter(tmp_path / "ta")
    draft, target = torch.randint(0, 24, (2, 5), generator=g), torch.randint(0, 24, (2, 7), generator=g)
    lengths = torch.tensor([5, 3])
    assert torch.equal(loaded.logits(draft, lengths, target), trained.logits(draft, lengths, target))
    assert loaded.propose([4, 5, 2], [3, 7], 4) == trained.propose([4, 5, 2], [3, 7], 4)
    config = json.loads((tmp_path / "ta" / "config.json").read_text())
    assert config["drafter_type"] == "token_adapter"
    assert config["source_store"]["identity"]["kind"] == "tokens"

    trained = drafter_from_checkpoint(load_checkpoint(eagle3_run))
    for fmt in ("native", "speculators"):
        loaded = load_drafter(export_run(eagle3_run, tmp_path / fmt, fmt))
        feats, tokens = torch.randn(1, 6, 96, generator=g), torch.randint(0, 24, (1, 6), generator=g)
        context = {"prompt": torch.randn(1, 96, generator=g), "prompt_token": torch.tensor([7]),
                   "video": torch.randn(1, loaded.config.video_rows, 96, generator=g)}
        assert loaded.config.prompt_context and loaded.config.to_dict() == trained.config.to_dict()
        for a, b in zip(loaded.ttt(feats, tokens, context=context), trained.ttt(feats, tokens, context=context)):
            assert torch.equal(a, b)
        prefix = tokens[0, :4].tolist()
        rows = PromptRows(feats[0], context["prompt"][0], 7, context["video"][0])
        assert loaded.propose(rows, prefix, 3) == trained.propose(rows, prefix, 3)
        assert len(loaded.propose(rows, [], 3)[0]) == 3                       # the first round proposes
        assert torch.equal(loaded.d2t, trained.d2t) and torch.equal(loaded.t2d, trained.t2d)


def test_speculators_layout(eagle3_run, tmp_path):
    out = export_run(eagle3_run, tmp_path / "spec", "speculators", "last")
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["architectures"] == ["Eagle3Speculator"]
    assert config["norm_before_residual"] is False and config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert config["draft_vocab_size"] == 16 and config["transformer_layer_config"]["model_type"] == "llama"
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["proposal_type"] == "greedy" and spec["verifier"]["name_or_path"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert config["specalign_prompt_context"]["enabled"] and config["specalign_prompt_context"]["video_rows"] == 2
    assert {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "layers.0.hidden_norm.weight", "context_embed",
            "layers.0.input_layernorm.weight", "layers.0.self_attn.q_proj.weight",
            "layers.0.mlp.down_proj.weight"} <= keys


def test_speculators_verifier_is_absolute_or_given_and_the_store_is_recorded(eagle3_run, tmp_path, monkeypatch):
    """The verifier was written as the store's relative path: from_pretrained failed from any other directory."""
    monkeypatch.chdir(tmp_path)
    out = export_run(eagle3_run, tmp_path / "spec", "speculators")
    config = json.loads((out / "config.json").read_text())
    verifier = config["speculators_config"]["verifier"]["name_or_path"]
    assert verifier == str((tmp_path / "tiny" / "target").resolve())      # the store recorded "tiny/target"
    assert config["source_store"]["identity"]["target"]["name"] == "tiny-target"
    out = export_run(eagle3_run, tmp_path / "spec_id", "speculators", verifier="LanguageBind/Video-LLaVA-7B-hf")
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_config"]["verifier"]["name_or_path"] == "LanguageBind/Video-LLaVA-7B-hf"


def test_plot_overlays_runs(token_run, eagle3_run, tmp_path):
    from specalign.train.plot import main as plot_main
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("plot", overrides=[f"runs=[{token_run},{eagle3_run}]", f"out={tmp_path / 'both.png'}"])
    plot_main.run(cfg)
    assert (tmp_path / "both.png").stat().st_size > 10_000
