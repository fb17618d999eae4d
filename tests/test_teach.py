"""Teaching the tiny pair (train/teach.py): the answer-only loss, that teaching works, the cache."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from specalign.data.samples import Request
from specalign.data.synth import synthesize
from specalign.train import teach
from specalign.train.teach import (
    TeachModule,
    cached_teach,
    collate,
    examples,
    fit,
    load_world,
    split,
    token_accuracy,
    world_config,
)
from specalign.vlms.eventgpt_backend import EventGPTBackend
from specalign.vlms.hf_backend import left_pad
from specalign.vlms.tiny import tiny_pair
from specalign.vlms.video_llava_backend import VideoLlavaBackend

from specalign.runtime import torch_threads

CLIPS = 8   # 7 train clips, 1 test clip, no val clip (seed-independent split by clip id)
FAST = {"durations": ["1s"], "clips": CLIPS, "epochs": 2, "val_clips": 1, "val_every": 1, "max_new_tokens": 8}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("world")
    synthesize(out, clips=CLIPS, seed=0, durations=("1s",))
    return {"out": str(out), "clips": CLIPS, "seed": 0, "durations": ["1s"]}


@pytest.fixture(scope="module")
def clips(world):
    return split(load_world(world["out"], ["1s"], None))


@pytest.fixture
def target():
    model, _, tokenizer = tiny_pair(0)
    return VideoLlavaBackend(model, tokenizer)


def test_examples_use_the_extraction_prompt_and_the_target_style_reference(clips, target):
    train, _ = clips
    first = examples(target, train[:1])[2]
    assert first.prompt == target.prompt_ids(train[0].questions[2])
    answer = train[0].meta["references"]["target"][2]
    assert target.decode(first.answer) == " ".join(target.tokenizer.tokenize(answer))
    assert first.answer[-1] == target.eos_id


def test_collate_pads_left_and_labels_only_the_answers(clips, target):
    items = examples(target, clips[0][:1])[2:4]
    batch = collate(items, target.pad_id)
    ids, mask = left_pad([e.prompt + e.answer for e in items], target.pad_id)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    for row, e in zip(batch["labels"], items):
        labelled = row[row != teach.IGNORE].tolist()
        assert labelled == e.answer and row[-len(e.answer):].tolist() == e.answer


def test_teaching_lowers_the_answer_loss_and_reproduces_training_captions(clips, target):
    train, held_out = clips
    items = examples(target, train)
    batch = collate(items, target.pad_id)
    module = TeachModule(target, lr=3e-3, weight_decay=0.0, warmup=0.0, max_new_tokens=40)
    with torch.no_grad():
        loss_before, acc_before = module.answer_loss(batch)
    requests = [e.request for e in items]
    generated_before = target.generate(target.prepare(requests), 40)
    fit(target, train, held_out, {**teach.teach_settings(FAST), "epochs": 20}, teach.EpochLines("target"))
    with torch.no_grad():
        loss_after, acc_after = module.answer_loss(batch)
    generated_after = target.generate(target.prepare(requests), 40)
    answers = [e.answer for e in items]
    assert loss_after < loss_before / 4
    assert acc_before < 0.1 and acc_after > 0.6
    assert token_accuracy(generated_after, answers) > token_accuracy(generated_before, answers) + 0.3


def test_cached_pair_loads_and_generates_and_is_reused(world, clips, tmp_path, monkeypatch):
    target_dir, draft_dir = cached_teach(world, FAST, tmp_path)          # the draft taught in a second process
    entry = target_dir.parent
    assert draft_dir.parent == entry and json.loads((entry / "done.json").read_text())["key"] == entry.name
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]          # no temp directory left
    requests = [Request(clips[1][0], 0, clips[1][0].questions[0])]
    for backend in (VideoLlavaBackend.from_pretrained(target_dir, quant="fp32"),
                    EventGPTBackend.from_pretrained(draft_dir, quant="fp32")):
        response = backend.generate(backend.prepare(requests), 8)[0]
        assert response and backend.decode(response).strip()

    def no_training(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(teach, "teach_pair", no_training)
    assert cached_teach(world, FAST, tmp_path) == (target_dir, draft_dir)
    assert cached_teach({**world, "workers": 4}, dict(FAST), tmp_path) == (target_dir, draft_dir)


@pytest.mark.parametrize("change", [{"teach": {"lr": 1e-3}}, {"teach": {"epochs": 3}}, {"world": {"seed": 1}},
                                    {"world": {"threshold": 0.3}}])
def test_a_changed_configuration_retrains(world, tmp_path, monkeypatch, change):
    calls = []

    def fake_teach_pair(world_dir, out_dir, cfg, parallel=True):
        calls.append(cfg)
        for role in ("target", "draft"):
            (out_dir / role).mkdir()

    monkeypatch.setattr(teach, "teach_pair", fake_teach_pair)
    first = cached_teach(world, FAST, tmp_path)
    assert cached_teach(world, FAST, tmp_path) == first and len(calls) == 1
    changed = cached_teach({**world, **change.get("world", {})}, {**FAST, **change.get("teach", {})}, tmp_path)
    assert changed != first and len(calls) == 2


def test_a_killed_run_leaves_no_cache_entry(world, tmp_path, monkeypatch):
    def killed(world_dir, out_dir, cfg, parallel=True):
        (out_dir / "target").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(teach, "teach_pair", killed)
    with pytest.raises(KeyboardInterrupt):
        cached_teach(world, FAST, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_teach_settings_are_refused():
    with pytest.raises(ValueError, match="epoch"):
        teach.teach_settings({"epoch": 3})


def test_a_world_without_its_synth_config_is_keyed_by_its_index(world, tmp_path):
    fingerprint = world_config(world["out"])
    assert fingerprint["out"] == world["out"] and "index_sha256" in fingerprint
    other = synthesize(tmp_path, clips=CLIPS, seed=1, durations=("1s",))["1s"].parent
    assert world_config(other)["index_sha256"] != fingerprint["index_sha256"]


def test_cli_teaches_and_prints_both_models_side_by_side(world, tmp_path):
    args = [f"world={world['out']}", f"out={tmp_path / 'pair'}", f"cache_root={tmp_path / 'cache'}",
            "teach.durations=[1s]", f"teach.clips={CLIPS}", "teach.epochs=1", "parallel=false", "show=1"]
    run = subprocess.run([sys.executable, "-c", "from specalign.cli import main; main()", "teach", *args],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "raw draft accepted by the target" in run.stdout and "token accuracy" in run.stdout
    assert (tmp_path / "pair" / "teach.json").is_file()
