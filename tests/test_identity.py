"""Drafters meet only stores of the models they were trained on: evaluate (offline and online) and train's
resume compare the store's identity (specalign.identity) and refuse with what differs; damaged drafter
directories give one-line errors naming the file."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest_train import FAST, TINY_TOKEN_ADAPTER, make_store, train_config
from hydra import compose, initialize_config_dir
from specalign.adapters.eagle3 import Eagle3Config, Eagle3Drafter
from specalign.adapters.export_format import load_drafter, save_drafter
from specalign.adapters.token_adapter import TokenAdapter, TokenAdapterConfig
from specalign.data.store import FeatureStore
from specalign.specdec.evaluate import evaluate_offline
from specalign.train.train import main as train_main
from specalign.train.train import source_info

from specalign.errors import DataError, OutputInUse, StoreMismatch
from specalign.paths import CONF_DIR


def edit_manifest(store, **models):
    """Change fields of the store's model identities, e.g. target={"name": "other"}."""
    m = json.loads((store / "manifest.json").read_text())
    for model, fields in models.items():
        m[model].update(fields)
    (store / "manifest.json").write_text(json.dumps(m))
    return store


def copy_store(store, dest, **models):
    shutil.copytree(store, dest)
    return edit_manifest(dest, **models)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """World A and world B: stores of the same architecture whose models were taught differently."""
    root = tmp_path_factory.mktemp("worlds")
    a = edit_manifest(make_store(root / "a", seed=0), target={"weights": "taught-on-a"}, draft={"weights": "d-a"})
    b = edit_manifest(make_store(root / "b", seed=1), target={"weights": "taught-on-b"}, draft={"weights": "d-b"})
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def eagle3_of_a(stores, tmp_path_factory):
    c = Eagle3Config(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                     vocab_size=24, draft_vocab_size=16, feature_names=["target.h1", "target.h2", "target.h3"],
                     fc_in_features=96, aux_layer_ids=[1, 2, 3], ttt_steps=3)
    out = tmp_path_factory.mktemp("drafters") / "eagle3"
    return save_drafter(Eagle3Drafter(c), out, {"source_store": source_info(FeatureStore(stores["a"]))})


def token_adapter(out, vocab: int, source: dict):
    c = TokenAdapterConfig(vocab_size=vocab, n_layer=1, d_model=16, n_head=2, d_ff=32, max_len=32)
    return save_drafter(TokenAdapter(c), out, {"source_store": source})


def test_token_adapter_of_another_vocabulary_is_refused_even_when_allowed(stores, tmp_path):
    """A 32,000-token TokenAdapter on a 24-token store ran and printed numbers."""
    identity = json.loads((stores["a"] / "manifest.json").read_text())
    source = source_info(FeatureStore(stores["a"])) | {"identity": {**identity, "target": {
        **identity["target"], "vocab_size": 32000}}}
    drafter = token_adapter(tmp_path / "ta32k", 32000, source)
    for allow in (False, True):
        with pytest.raises(StoreMismatch, match=r"cannot run on this store: target.vocab_size: drafter 32000, store 24"):
            evaluate_offline(stores["a"], "all", [3], str(drafter), allow_store_mismatch=allow)


def test_eagle3_of_one_world_on_another_world_is_refused_unless_allowed(stores, eagle3_of_a):
    report = evaluate_offline(stores["a"], "all", [3], str(eagle3_of_a))
    assert "drafter" in report["results"]
    with pytest.raises(StoreMismatch, match=r"target.weights: trained on \"taught-on-a\", store has \"taught-on-b\"; "
                                            r"draft.weights: .*allow_store_mismatch=true"):
        evaluate_offline(stores["b"], "all", [3], str(eagle3_of_a))
    report = evaluate_offline(stores["b"], "all", [3], str(eagle3_of_a), allow_store_mismatch=True)
    assert "drafter" in report["results"]


def test_manifest_edited_to_other_models_or_sizes_is_refused(stores, eagle3_of_a, tmp_path):
    other = copy_store(stores["a"], tmp_path / "renamed", target={"name": "llava-next", "config_hash": "x"})
    with pytest.raises(StoreMismatch, match=r"target.name: trained on \"tiny-target\", store has \"llava-next\"; "
                                            r"target.config_hash"):
        evaluate_offline(other, "all", [3], str(eagle3_of_a))
    wider = copy_store(stores["a"], tmp_path / "wider", target={"hidden_size": 64})
    for allow in (False, True):
        with pytest.raises(StoreMismatch, match=r"cannot run on this store: target.hidden_size: drafter 32, store 64"):
            evaluate_offline(wider, "all", [3], str(eagle3_of_a), allow_store_mismatch=allow)


def test_online_evaluate_refuses_the_pair_before_loading_models(stores, eagle3_of_a, tmp_path):
    from specalign.specdec.online_eval import run_online

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", [f"store={stores['b']}", f"drafter={eagle3_of_a}", "mode=online", "models=tiny",
                                   "split=all", f"out={tmp_path / 'report'}"])
    with pytest.raises(StoreMismatch, match="target.weights"):
        run_online(cfg, [3])


def test_resume_on_a_store_of_other_models_is_refused(stores, tmp_path):
    run = tmp_path / "run"
    common = [*TINY_TOKEN_ADAPTER, *FAST, "trainer.max_steps=2"]
    train_main.run(train_config(stores["a"], run, *common))
    with pytest.raises(OutputInUse, match=r"store.target.weights: it has \"taught-on-a\", this run has \"taught-on-b\".*"
                                          r"allow_store_mismatch=true"):
        train_main.run(train_config(stores["b"], run, *common, "trainer.max_steps=4", "resume=true"))
    wider = copy_store(stores["b"], tmp_path / "wider", target={"vocab_size": 25})
    with pytest.raises(OutputInUse, match=r"store.target.vocab_size: it has 24, this run has 25"):
        train_main.run(train_config(wider, run, *common, "resume=true", "allow_store_mismatch=true"))


# ------------------------------------------------------------------------------- damaged drafter directories

@pytest.fixture
def drafter_dir(stores, tmp_path):
    return token_adapter(tmp_path / "ta", 24, source_info(FeatureStore(stores["a"])))


def test_invalid_config_json_names_the_file(drafter_dir, stores):
    (drafter_dir / "config.json").write_text('{"format": "specalign-drafter", "drafter_type": ')
    for load in (lambda: load_drafter(drafter_dir), lambda: evaluate_offline(stores["a"], "all", [3], str(drafter_dir))):
        with pytest.raises(DataError, match=rf"^{drafter_dir}/config.json: not valid JSON"):
            load()


def test_truncated_weights_name_the_file(drafter_dir):
    weights = drafter_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-500])
    with pytest.raises(DataError, match=rf"^{weights}: not a readable safetensors file .*truncated or damaged"):
        load_drafter(drafter_dir)


def test_edited_vocabulary_names_the_files(drafter_dir):
    config = json.loads((drafter_dir / "config.json").read_text())
    config["config"]["vocab_size"] = 30
    (drafter_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=rf"^{drafter_dir}/model.safetensors: the weights do not fit config.json "
                                        r"\(size mismatch for .*was either file edited\?") as e:
        load_drafter(drafter_dir)
    assert "\n" not in str(e.value)
