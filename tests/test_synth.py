"""The synthetic event world: the event simulator at pixel level, scenes, clips, the written
dataset (layout, determinism) and the `specalign synth` stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from specalign.data import captions
from specalign.data.dsec import load_dataset, read_event_images
from specalign.data.events import read_event_clip, render_event_frames
from specalign.data.synth import (
    MIN_CONTRAST,
    WorldConfig,
    contrast,
    record_clip,
    sample_scene,
    simulate_events,
    synthesize,
)
from specalign.data.video import decode_all_frames

REPO = Path(__file__).resolve().parents[1]


def one_pixel(log_levels, dt_us: int = 1000):
    """A 1x1 sensor whose log intensity follows `log_levels`, one frame every dt_us."""
    log = np.asarray(log_levels, np.float64)[:, None, None]
    return log, np.arange(len(log)) * dt_us


# ---------------------------------------------------------------------------- simulator

@pytest.mark.parametrize("change, threshold, n_expected", [(1.0, 0.2, 5), (1.0, 0.25, 4), (0.7, 0.2, 3)])
def test_brightening_pixel_emits_threshold_count_of_on_events(change, threshold, n_expected):
    log, t = one_pixel(np.linspace(0.0, change, 21))
    ev = simulate_events(log, t, threshold=threshold)
    assert len(ev) == n_expected
    assert (ev["p"] == 1).all()
    assert (np.diff(ev["t"]) > 0).all() and ev["t"].min() > 0 and ev["t"].max() <= t[-1]


def test_crossing_times_are_interpolated_linearly():
    log, t = one_pixel(np.linspace(0.0, 1.0, 11))              # +0.1 per ms
    np.testing.assert_array_equal(simulate_events(log, t, 0.2)["t"], [2000, 4000, 6000, 8000, 10000])
    jump, t2 = one_pixel([0.0, 1.0])                           # all in one step: several events
    np.testing.assert_array_equal(simulate_events(jump, t2, 0.2)["t"], [200, 400, 600, 800, 1000])


def test_dimming_pixel_emits_off_events_and_reference_persists():
    log, t = one_pixel([0.0, -0.3, -0.3, -0.1, -0.45])
    ev = simulate_events(log, t, threshold=0.2)
    # -0.3: one OFF (ref -0.2); -0.1: |0.1| < 0.2 nothing; -0.45: one OFF (ref -0.4)
    assert ev["p"].tolist() == [0, 0]
    assert ev["t"].tolist()[0] <= 1000 and 3000 < ev["t"].tolist()[1] <= 4000


def test_static_scene_emits_nothing_without_noise():
    texture = np.log(np.random.default_rng(0).uniform(0.1, 0.9, (6, 8)))
    log = np.broadcast_to(texture, (50, 6, 8))
    t = np.arange(50) * 1000
    assert len(simulate_events(log, t, 0.2)) == 0
    noisy = simulate_events(log, t, 0.2, noise_rate=200.0, rng=np.random.default_rng(1))
    expected = 200.0 * 48 * 0.049
    assert abs(len(noisy) - expected) < 5 * np.sqrt(expected)
    assert (np.diff(noisy["t"]) >= 0).all() and noisy["x"].max() < 8 and noisy["y"].max() < 6


def test_only_the_changing_pixel_fires():
    log = np.zeros((5, 2, 3))
    log[:, 1, 2] = np.linspace(0, 0.9, 5)
    ev = simulate_events(log, np.arange(5) * 1000, 0.2)
    assert len(ev) == 4 and set(ev["x"]) == {2} and set(ev["y"]) == {1}


def test_refractory_period_suppresses_events():
    log, t = one_pixel(np.linspace(0.0, 2.0, 101))          # one crossing per 10 ms
    free = simulate_events(log, t, 0.2)
    blind = simulate_events(log, t, 0.2, refractory_us=20_000)
    assert len(free) == 10
    assert 1 <= len(blind) < len(free)
    assert (np.diff(blind["t"]) >= 20_000).all()
    jump, t2 = one_pixel([0.0, 1.0])                         # a burst is capped to one event per step
    assert len(simulate_events(jump, t2, 0.2, refractory_us=500)) == 1


# ---------------------------------------------------------------------------- scenes and clips

def test_scenes_are_valid():
    for seed in range(50):
        scene = sample_scene(np.random.default_rng(seed), 64, 48, max_objects=3, plan_s=1.0)
        objs = scene["objects"]
        assert 1 <= len(objs) <= 3
        assert len({o["shape"] for o in objs}) == len({o["color"] for o in objs}) == len(objs)
        for o in objs:
            assert contrast(o["color"], scene["background"]["tone"]) >= MIN_CONTRAST
            for when in (0.0, 1.0):
                x, y = np.add(o["start_xy"], np.multiply(o["velocity_px_s"], when))
                r = o["radius_px"]
                assert r <= x <= 64 - r and r <= y <= 48 - r
        json.dumps(scene)


def test_record_clip_gives_both_cameras():
    world = WorldConfig()
    scene = sample_scene(np.random.default_rng(3), world.width, world.height)
    clip = record_clip(scene, 0.5, world, np.random.default_rng(0))
    assert clip.video.shape == (10, 48, 64, 3) and clip.video.dtype == np.uint8
    assert len(clip.event_frames) == world.n_event_frames
    ev = clip.events
    assert len(ev) > 100 and set(np.unique(ev["p"])) == {0, 1}
    assert (np.diff(ev["t"]) >= 0).all() and 0 < ev["t"].min() and ev["t"].max() <= 500_000
    assert ev["x"].max() < 64 and ev["y"].max() < 48


def test_vocabulary_covers_every_reference():
    vocab = set(captions.vocabulary())
    for seed in range(30):
        scene = sample_scene(np.random.default_rng(seed), 64, 48, max_objects=3)
        for style in ("target", "draft"):
            answers = captions.references(scene, style)
            assert len(answers) == len(captions.questions())
            assert set().union(*(captions.words(a) for a in answers)) <= vocab
    assert not any(c in " ".join(captions.references(scene, "draft")) for c in captions.COLORS)
    assert 50 < len(vocab) < 500


# ---------------------------------------------------------------------------- dataset on disk

@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, clips=3, seed=7)
    return out


def test_layout(world_dir):
    world = WorldConfig()
    for duration, n_video in (("1s", 20), ("500ms", 10)):
        root = world_dir / f"synthetic_{duration}"
        rows = json.loads((root / f"synthetic_{duration}.json").read_text())
        assert [r["id"] for r in rows] == ["synth_00/000000", "synth_00/000001", "synth_00/000002"]
        row = rows[0]
        assert {"id", "split", "event_data", "video_data", "event_image", "conversations", "ground_truth",
                "references", "duration", "n_events"} == set(row)
        assert row["event_data"] == "event_npy/synth_00/000000.npy"
        assert row["video_data"] == "mp4/synth_00/000000.mp4"
        assert row["event_image"] == [f"event_image/synth_00/000000_{k}.png" for k in range(5)]
        assert len(row["references"]["target"]) == len(row["references"]["draft"]) == 6
        clip = read_event_clip(root / row["event_data"])          # safe decoder reads our own files
        assert len(clip.events) == row["n_events"]
        assert clip.meta == {"height": 48, "width": 64, "t_start_us": 0,
                             "t_end_us": 1_000_000 if duration == "1s" else 500_000}
        assert decode_all_frames(root / row["video_data"]).shape == (n_video, 48, 64, 3)
        images = read_event_images([root / p for p in row["event_image"]])
        expected = render_event_frames(clip.events, world.n_event_frames, 48, 64)
        for image, frame in zip(images, expected):
            np.testing.assert_array_equal(image, frame)
        samples, errors = load_dataset(root)
        assert len(samples) == 3 and errors == [] and samples[0].questions == captions.questions()


def test_same_scene_in_both_durations(world_dir):
    rows = {d: json.loads((world_dir / f"synthetic_{d}" / f"synthetic_{d}.json").read_text())
            for d in ("1s", "500ms")}
    for a, b in zip(rows["1s"], rows["500ms"]):
        assert a["ground_truth"] == b["ground_truth"] and a["references"] == b["references"]
        assert a["split"] == b["split"]


def test_same_seed_same_bytes(world_dir, tmp_path):
    synthesize(tmp_path, clips=3, seed=7)
    files = sorted(p.relative_to(world_dir) for p in world_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        assert (world_dir / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_other_seed_other_world(world_dir, tmp_path):
    synthesize(tmp_path, clips=3, seed=8, durations=("500ms",))
    name = "synthetic_500ms/synthetic_500ms.json"
    assert (tmp_path / name).read_bytes() != (world_dir / name).read_bytes()


# ---------------------------------------------------------------------------- the stage

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "specalign.cli", *args], check=False, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_synth(tmp_path):
    out = tmp_path / "world"
    result = run_cli("synth", f"out={out}", "clips=2", "workers=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for duration in ("1s", "500ms"):
        rows = json.loads((out / f"synthetic_{duration}" / f"synthetic_{duration}.json").read_text())
        assert len(rows) == 2
        assert f"wrote 2 clips of {duration} to {out / f'synthetic_{duration}'}" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]   # no outputs/ junk in cwd


def test_cli_synth_help(tmp_path):
    result = run_cli("synth", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for key in ("clips:", "seed:", "threshold:", "refractory_us:", "noise_rate:", "durations:"):
        assert key in result.stdout
