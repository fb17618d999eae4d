"""`specalign evaluate mode=online` on the tiny pair, a small synthetic world and tiny trained drafters:
online greedy output is the target's greedy output and online acceptance equals the offline simulation
for every drafter, the target drafting for itself is always accepted, the CLI writes the report.
Speculative sampling (temperature=T): every drafter runs in sampling mode with valid proposal
distributions q, and at T -> 0 it reproduces the greedy runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from hydra import compose, initialize_config_dir
from specalign.adapters.eagle3 import context_inputs
from specalign.data.store import FeatureStore
from specalign.data.synth import synthesize
from specalign.specdec import offline
from specalign.specdec.drafters import report_drafters
from specalign.specdec.evaluate import evaluate_offline
from specalign.specdec.metrics import Acceptance, rounds_from_runs
from specalign.specdec.online import Sampling, speculative_generate
from specalign.specdec.online_eval import (
    eos_ids,
    load_samples,
    online_report,
    prefill_spec,
    requests_of_rows,
    run_entry,
    run_online,
    sampling_entries,
)
from specalign.specdec.tree import TreeSpec
from specalign.train.export import export_run
from specalign.train.extract import extract
from specalign.train.train import main as train_main
from specalign.vlms.registry import build_backends

from specalign.paths import CONF_DIR, REPO_ROOT
from tests.engine_drafters import TargetAsDrafter

GAMMAS, MAX_NEW, CLIPS = [2, 4], 16, 32
QUESTION = "What is happening in this scene?"
ADAPTER_STEPS = ["trainer.max_steps=150", "trainer.enable_progress_bar=false", "val.max_rows=1", "val.gamma=3"]
DRAFTERS = {
    "token_adapter": ["adapter.n_layer=1", "adapter.d_model=32", "adapter.n_head=2", "adapter.d_ff=64",
                      "adapter.max_len=64", "adapter.batch_size=8", "adapter.warmup_steps=2", "adapter.lr=1e-2"],
    **{f"eagle3_{source}": ["adapter=eagle3", f"adapter.feature_source={source}", "adapter.num_attention_heads=4",
                            "adapter.intermediate_size=64", "adapter.draft_vocab_size=64", "adapter.ttt_steps=2",
                            "adapter.batch_size=8", "adapter.warmup_steps=2", "adapter.max_len=64", "adapter.lr=1e-2"]
       for source in ("target", "both")},
}
RESULT_KEYS = {"tau", "alpha", "alpha_at", "rounds", "tokens", "samples"}


def config(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A store of the tiny pair over 32 synthetic clips (one question each), and exported drafters
    trained on its train split: a TokenAdapter, EAGLE-3 on target features and on target + draft features."""
    root = tmp_path_factory.mktemp("online")
    data = synthesize(root / "world", clips=CLIPS, seed=0, durations=("1s",))["1s"]
    store = root / "store"
    extract(config("extract", f"data.root={data}", f"out={store}", f"max_new_tokens={MAX_NEW}",
                   f"data.questions=[{QUESTION}]", "trainer.accelerator=cpu"))
    out = {"store": store}
    for name, overrides in DRAFTERS.items():
        train_main.run(config("train", f"store={store}", f"out={root / name}", *overrides, *ADAPTER_STEPS))
        out[name] = export_run(root / name, root / f"{name}_drafter")
    assert FeatureStore(store).select("test"), "the world should have test clips"
    return out


def online_config(world: dict, drafter: str, no_draft: str | None = None, *overrides: str):
    return config("evaluate", f"store={world['store']}", "mode=online", "models=tiny", "split=test",
                  f"gamma=[{','.join(map(str, GAMMAS))}]", f"drafter={world[drafter]}", "out=unused",
                  f"no_draft={world[no_draft] if no_draft else 'null'}", *overrides)


@pytest.fixture(scope="module")
def online(world) -> dict:
    """name -> (config, OnlineRuns): the TokenAdapter with its no-draft ablation, and EAGLE-3 on target +
    draft features with EAGLE-3 on target features as its no_draft."""
    configs = {"token_adapter": online_config(world, "token_adapter"),
               "eagle3": online_config(world, "eagle3_both", "eagle3_target")}
    return {name: (cfg, run_online(cfg, GAMMAS)) for name, cfg in configs.items()}


@pytest.mark.parametrize("which", ["token_adapter", "eagle3"])
def test_online_greedy_output_is_the_target_greedy_output(online, which):
    """For every drafter and gamma: token for token the store's target response (the backend's batched
    `generate`) and the plain one-token-per-forward greedy decoding."""
    _, runs = online[which]
    assert set(runs.entries) == {"drafter", "no_draft", "raw_draft", "draft_model"}
    for p in runs.prepared:
        assert p.greedy.tokens == p.row.target_tokens
        assert p.draft.tokens == p.row.draft_tokens
    for entry in runs.entries.values():
        for g in GAMMAS:
            assert [r.tokens for r in entry.runs[g]] == [p.row.target_tokens for p in runs.prepared]


@pytest.mark.parametrize("which", ["token_adapter", "eagle3"])
def test_online_acceptance_equals_offline_simulation(online, world, which):
    """Per drafter and gamma: the same acceptance summary, and round for round the same accepted lengths
    (`rounds_trace`, what bench/specdec.py replays), on the online static engine and offline."""
    cfg, runs = online[which]
    on_report = online_report(cfg, GAMMAS, runs)
    off_report = evaluate_offline(world["store"], "test", GAMMAS, cfg.drafter, cfg.no_draft)
    on, off = on_report["results"], off_report["results"]
    assert set(on) <= set(off)
    for name in on:
        for g in map(str, GAMMAS):
            assert on[name][g] == off[name][g], (name, g)
            assert on_report["rounds_trace"][name][g] == off_report["rounds_trace"][name][g], (name, g)
    assert on["drafter"]["2"]["accepted"] > 0, "the trained drafter should get drafts accepted"


def test_online_eagle3_features_are_the_stored_rows(online, world):
    """The features the online EAGLE-3 drafter was fed (its last request) are the store's rows."""
    _, runs = online["eagle3"]
    drafter, row = runs.entries["drafter"].drafter, runs.prepared[-1].row
    store = FeatureStore(world["store"])
    for name, rows in drafter.inputs.rows.items():
        got = torch.cat(rows).float()[: len(row.target_tokens)]
        assert len(got) == len(row.target_tokens) if name.startswith("target.") else len(got) > 1, name
        torch.testing.assert_close(got, store.hidden(row, name)[: len(got)].float(), atol=2e-2, rtol=2e-2)


def test_online_eagle3_reads_the_stored_prompt_context_and_its_first_round_proposes(online, world):
    """EAGLE-3 with the prompt context (the default): online, the prompt row, last prompt token and video rows
    taken from the target's prefill are the store's, and every request's first round proposes gamma tokens."""
    _, runs = online["eagle3"]
    store = FeatureStore(world["store"])
    for name in ("drafter", "no_draft"):
        drafter, row = runs.entries[name].drafter, runs.prepared[-1].row
        c = drafter.model.config
        assert c.prompt_context and c.video_rows == store.context_spec["video_rows"]
        item = context_inputs(store, row, c.feature_names, c.context_features)
        got = drafter.inputs.prompt
        assert got.token == int(item["prompt_token"])
        torch.testing.assert_close(got.prompt.float(), item["prompt"].float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got.video.float(), item["video"].float(), atol=2e-2, rtol=2e-2)
        for g in GAMMAS:
            assert all(len(r.log[0].proposal) == g for r in runs.entries[name].runs[g]), (name, g)


def test_target_as_its_own_drafter_is_always_accepted(world):
    target, _ = build_backends({"tiny": True, "quant": "fp32"})
    store = FeatureStore(world["store"])
    rows = store.select("test")
    cfg = online_config(world, "token_adapter")
    acc = Acceptance(4)
    for row, request in zip(rows, requests_of_rows(rows, load_samples(cfg, store))):
        spec = prefill_spec(target.prepare([request]))
        result = speculative_generate(target.model, spec, TargetAsDrafter(target.model), gamma=4,
                                      max_new_tokens=MAX_NEW, eos_token_id=target.eos_id)
        assert result.tokens == row.target_tokens
        acc.add_sample(result.rounds)
    assert acc.alpha == 1.0 and acc.proposed > 0
    assert all(a == 1.0 for a in acc.alpha_at if a is not None)


def test_cli_writes_the_online_report(world, tmp_path):
    """Greedy results, costs and speedups, and (temperature=1.0) the speculative-sampling table."""
    out = tmp_path / "report"
    cmd = [sys.executable, "-c", "from specalign.cli import main; main()", "evaluate", "mode=online", "models=tiny",
           f"store={world['store']}", f"drafter={world['token_adapter']}", "split=test", "limit=2", "gamma=[2,3]",
           "temperature=1.0", f"out={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "online" and report["config"]["mode"] == "online"
    assert set(report["results"]) == {"drafter", "no_draft", "raw_draft", "draft_model"}
    for name, per_gamma in report["results"].items():
        assert set(per_gamma) == {"2", "3"}
        for s in per_gamma.values():
            assert RESULT_KEYS <= set(s) and s["samples"] == 2
        for g in ("2", "3"):
            assert set(report["speedup"][name][g]) == {"projected", "projected_e2e", "wall_clock"}
            assert report["speedup"][name][g]["wall_clock"] > 0
            assert {"setup_s", "round_s", "step_s", "tokens_per_s"} <= set(report["costs"]["drafters"][name][g])
    costs = report["costs"]
    assert all(costs[m][k] > 0 for m in ("target", "draft") for k in ("prefill_s", "decode_s", "tokens_per_s"))
    assert set(costs["target"]["verify_s"]) == {"2", "3"}
    assert {"tokens_fit", "accepted", "gap_s"} <= set(report["prefill_hiding"])
    assert report["checks"]["target_greedy_equals_store"] == 2
    md = (out / "report.md").read_text()
    assert "Speedup over plain target decoding" in md and "Prefill hiding" in md and "target prefill" in md
    # temperature=1.0: speculative sampling for every drafter too
    sampling = report["sampling_online"]
    assert set(sampling) == set(report["results"])
    for name, per_gamma in sampling.items():
        assert set(per_gamma) == {"2", "3"}
        for s in per_gamma.values():
            assert RESULT_KEYS <= set(s) and s["samples"] == 2 and s["temperature"] == 1.0
            assert (s["expected_alpha"] is None) == (name == "raw_draft")
    assert "Online speculative sampling" in md


def test_a_drafter_type_from_outside_the_package_trains_exports_and_evaluates(world, tmp_path):
    """tests/toy_drafter.py registers a bigram drafter the package has no code for. `specalign train`
    trains it (its config from tests/conf), export writes and reads it back, and both evaluations run it
    as they run the built-in types: online its greedy output is the target's and its acceptance equals the
    offline simulation's, also in sampling mode."""
    from toy_drafter import CONF

    train_main.run(config("train", f"store={world['store']}", f"out={tmp_path / 'run'}", "adapter=bigram",
                          f"hydra.searchpath=[file://{CONF}]", "trainer.max_steps=40", *ADAPTER_STEPS[1:]))
    drafter = export_run(tmp_path / "run", tmp_path / "drafter")
    assert json.loads((drafter / "config.json").read_text())["drafter_type"] == "bigram"
    off = evaluate_offline(world["store"], "test", GAMMAS, str(drafter))["results"]
    assert set(off) == {"drafter", "raw_draft", "draft_model"}
    cfg = online_config({**world, "bigram": drafter}, "bigram", None, "temperature=1.0")
    runs = run_online(cfg, GAMMAS)
    on = online_report(cfg, GAMMAS, runs)["results"]
    for g in GAMMAS:
        assert [r.tokens for r in runs.entries["drafter"].runs[g]] == [p.row.target_tokens for p in runs.prepared]
        assert on["drafter"][str(g)] == off["drafter"][str(g)], g
        assert all(len(r.tokens) > 0 for r in runs.sampled["drafter"].runs[g])
    assert off["drafter"]["2"]["accepted"] > 0, "the trained bigram should get drafts accepted"


# ----------------------------------------------------------------------------- speculative sampling

class Recorder:
    """A drafter wrapper keeping every (proposal, q) the drafter hands the engine."""

    def __init__(self, drafter):
        self.drafter, self.calls = drafter, []

    def begin(self, context):
        self.drafter.begin(context)

    def propose(self, accepted, gamma):
        tokens, q = self.drafter.propose(accepted, gamma)
        self.calls.append((list(tokens), q))
        return tokens, q

    def observe(self, accepted_tokens, hidden):
        self.drafter.observe(accepted_tokens, hidden)


@pytest.fixture(scope="module")
def tiny_models():
    return build_backends({"tiny": True, "quant": "fp32"})


@pytest.fixture(scope="module")
def sampled(world) -> dict:
    """name -> (config, OnlineRuns) with temperature=1.0 on two requests (greedy runs included)."""
    configs = {"token_adapter": online_config(world, "token_adapter", None, "temperature=1.0", "limit=2"),
               "eagle3": online_config(world, "eagle3_both", "eagle3_target", "temperature=1.0", "limit=2")}
    return {name: (cfg, run_online(cfg, GAMMAS)) for name, cfg in configs.items()}


@pytest.mark.parametrize("which", ["token_adapter", "eagle3"])
def test_online_sampling_reports_every_drafter(sampled, which):
    cfg, runs = sampled[which]
    report = online_report(cfg, GAMMAS, runs)
    assert set(report["sampling_online"]) == set(report["results"]) == {"drafter", "no_draft", "raw_draft",
                                                                        "draft_model"}
    for name, per_gamma in report["sampling_online"].items():
        assert set(per_gamma) == {str(g) for g in GAMMAS}
        for s in per_gamma.values():
            assert RESULT_KEYS <= set(s) and s["samples"] == 2 and s["rounds"] > 0
            assert s["temperature"] == 1.0 and s["seed"] == 0 and 0.0 <= s["alpha"] <= 1.0
            if name == "raw_draft":
                assert s["expected_alpha"] is None
            else:
                assert 0.0 < s["expected_alpha"] <= 1.0, name
    for entry in runs.sampled.values():
        for g in GAMMAS:
            for run in entry.runs[g]:
                assert 0 < len(run.tokens) <= MAX_NEW
                assert sum(r.generated for r in run.rounds) == len(run.tokens), "rounds are over the sampled output"


@pytest.mark.parametrize("which", ["token_adapter", "eagle3"])
def test_sampling_drafters_return_their_proposal_distributions(sampled, tiny_models, which):
    """The trained drafter and its ablation sample their proposals and return q: rows are distributions
    (nonnegative, sum 1) and every proposed token is in the support of its row; EAGLE-3's rows vanish
    outside the draft vocabulary."""
    _, runs = sampled[which]
    target, draft = tiny_models
    eos = eos_ids(runs.store, target, draft)["target"]
    g = torch.Generator()
    for name in ("drafter", "no_draft"):
        entry = runs.sampled[name]
        recorder = Recorder(entry.drafter)
        for i, p in enumerate(runs.prepared):
            g.manual_seed(i)
            run_entry(target, replace(entry, drafter=recorder), p, 4, MAX_NEW, eos, runs.sampling, g)
        calls = [(tokens, q) for tokens, q in recorder.calls if tokens]
        assert len(calls) > 2, name
        for tokens, q in calls:
            assert q is not None and q.shape[0] == len(tokens) and q.dtype == torch.float32, name
            assert (q >= 0).all()
            torch.testing.assert_close(q.sum(-1), torch.ones(len(tokens)), atol=1e-4, rtol=0)
            assert all(q[k, t] > 0 for k, t in enumerate(tokens)), "proposals must be in the support of q"
            assert not q[:, runs.sampling.vocab:].any(), "only ids both models read are proposed"
            if which == "eagle3":
                assert not q[:, ~entry.drafter.model.t2d.cpu()].any(), "q is zero outside the draft vocabulary"


@pytest.mark.parametrize("which", ["token_adapter", "eagle3"])
def test_sampling_at_low_temperature_reproduces_greedy(online, tiny_models, which):
    """T = 1e-4: p and q are one-hot at the argmax, so sampling drafts, accepts and outputs as greedy does."""
    _, runs = online[which]
    target, draft = tiny_models
    eos = eos_ids(runs.store, target, draft)["target"]
    cold, g = Sampling(temperature=1e-4), torch.Generator().manual_seed(0)
    entries = sampling_entries({n: runs.entries[n] for n in ("drafter", "no_draft")}, cold, g)
    for name, entry in entries.items():
        for gamma in GAMMAS:
            for p, greedy in zip(runs.prepared, runs.entries[name].runs[gamma]):
                run = run_entry(target, entry, p, gamma, MAX_NEW, eos, cold, g)
                assert run.tokens == greedy.tokens, (name, gamma)
                assert run.rounds == greedy.rounds, (name, gamma)


@pytest.mark.parametrize("drafter", ["token_adapter", "eagle3_both"])
def test_trees_online_equal_plain_greedy_and_the_offline_walk(world, drafter):
    """Draft trees of trained drafters (the TokenAdapter with its no-draft variant on the growing cache, EAGLE-3
    with the target's hidden states on the static engine): online (one tree forward, compaction) token for token
    plain greedy decoding and round for round the offline walk; a top-1 tree of budget gamma is exactly the chain;
    the offline report puts each tree beside its chain."""
    g, spec = max(GAMMAS), TreeSpec(6, 2, (max(GAMMAS),))
    engine = "engine.kind=dynamic" if drafter == "token_adapter" else "engine.kind=static"
    cfg = online_config(world, drafter, None, engine, "limit=2", "tree.budget=6", "tree.topk=2")
    runs = run_online(cfg, [g])
    store, rows = FeatureStore(world["store"]), [p.row for p in runs.prepared]
    for d in report_drafters(cfg.drafter, None, "offline"):
        online = runs.entries[d.name + "+tree"].runs[g]
        assert [run.tokens for run in online] == [p.greedy.tokens for p in runs.prepared], d.name
        walked, nodes = offline.drafter_tree_rounds(d, store, rows, g, spec)
        assert [run.rounds for run in online] == walked, d.name
        assert sum(nodes) / len(nodes) > g, "a tree verifies more nodes than its depth"
        top1, _ = offline.drafter_tree_rounds(d, store, rows, g, TreeSpec(g, 1))
        chains = offline.drafter_runs(d, store, rows, g)
        assert top1 == [rounds_from_runs(*r, len(row.target_tokens), g) for r, row in zip(chains, rows)], d.name
    assert online_report(cfg, [g], runs)["tree"]["width"].keys() == {n for n in runs.entries if n.endswith("+tree")}
    if drafter == "eagle3_both":     # one drafter: one offline walk over the split
        report = evaluate_offline(world["store"], "test", GAMMAS, cfg.drafter, tree=spec)
        assert list(report["results"])[:3] == ["drafter", "drafter+tree", "raw_draft"]
        assert set(report["results"]["drafter+tree"]) == {str(g)} and set(report["tree"]["width"]) == {"drafter+tree"}
