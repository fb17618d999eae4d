"""Reading DSEC-clip datasets: typed samples, questions, skip-and-record, clear errors, conf/data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from specalign.data import captions
from specalign.data.dsec import (
    duration_of_root,
    duration_seconds,
    load_dataset,
    read_event_images,
    sample_from_row,
    write_image,
)
from specalign.data.events import EVENT_DTYPE, save_event_clip
from specalign.data.layouts import load_from_config
from specalign.data.samples import Sample
from specalign.data.video import write_video

from specalign.errors import DataError

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"
QUESTIONS = ["What is this scene about?", "Describe the following scene."]


def write_dataset(root: Path, n: int = 3) -> list[dict]:
    """A tiny DSEC-clip dataset: n clips of sequence "zurich_00", index JSON named after root."""
    rows = []
    for k in range(n):
        cid = f"zurich_00/{k:06d}"
        ev = np.zeros(4, EVENT_DTYPE)
        ev["x"], ev["t"], ev["p"] = [0, 1, 2, 3], [10, 20, 30, 40], [1, 0, 1, 0]
        save_event_clip(root / f"event_npy/{cid}.npy", ev)
        write_video(root / f"mp4/{cid}.mp4", np.full((2, 8, 8, 3), 50 * k, np.uint8))
        images = [f"event_image/{cid}_{j}.png" for j in range(2)]
        for rel in images:
            write_image(root / rel, np.full((8, 8, 3), 255, np.uint8))
        rows.append({
            "id": cid, "split": "train", "event_data": f"event_npy/{cid}.npy",
            "video_data": f"mp4/{cid}.mp4", "event_image": images,
            "conversations": [{"from": "human", "value": f"<event>\n{QUESTIONS[0]}"},
                              {"from": "gpt", "value": "A road."},
                              {"from": "human", "value": QUESTIONS[1]},
                              {"from": "gpt", "value": "Cars."}],
            "ground_truth": {"k": k},
        })
    (root / f"{root.name}.json").write_text(json.dumps(rows))
    return rows


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "dsec_1s"
    write_dataset(root)
    return root


@pytest.fixture
def dataset(pristine, tmp_path) -> Path:
    """A fresh copy a test may break."""
    return Path(shutil.copytree(pristine, tmp_path / pristine.name))


def test_typed_samples(pristine):
    samples, errors = load_dataset(pristine)
    assert errors == [] and len(samples) == 3 and all(isinstance(s, Sample) for s in samples)
    s = samples[1]
    assert s.id == "1s/zurich_00/000001" and s.split == "train" and s.duration == "1s"
    assert s.video_path == pristine / "mp4/zurich_00/000001.mp4" and s.video_path.is_file()
    assert s.event_path == pristine / "event_npy/zurich_00/000001.npy"
    assert [p.name for p in s.event_images] == ["000001_0.png", "000001_1.png"]
    assert s.questions == QUESTIONS                      # from conversations, placeholder removed
    assert s.meta == {"ground_truth": {"k": 1}}


def test_questions_limit_and_duration_overrides(pristine):
    samples, _ = load_dataset(pristine, questions=["Q?"], limit=2, duration="500ms")
    assert len(samples) == 2 and samples[0].questions == ["Q?"] and samples[0].duration == "500ms"


def test_durations():
    assert duration_of_root("/x/dsec_500ms") == "500ms" and duration_of_root("synthetic_1s") == "1s"
    assert duration_seconds("500ms") == 0.5 and duration_seconds("1s") == 1.0
    with pytest.raises(DataError, match="data.duration"):
        duration_of_root("/x/dsec")
    with pytest.raises(ValueError):
        duration_seconds("fast")


def test_skip_and_record(dataset):
    (dataset / "mp4/zurich_00/000000.mp4").unlink()
    (dataset / "event_image/zurich_00/000002_1.png").unlink()
    samples, errors = load_dataset(dataset)
    assert [s.id for s in samples] == ["1s/zurich_00/000001"]
    assert [e["id"] for e in errors] == ["1s/zurich_00/000000", "1s/zurich_00/000002"]
    assert errors[0]["path"] == str(dataset / "mp4/zurich_00/000000.mp4")
    assert errors[1]["path"] == str(dataset / "event_image/zurich_00/000002_1.png")
    assert all("missing" in e["reason"] for e in errors)
    with pytest.raises(DataError) as err:
        load_dataset(dataset, strict=True)
    assert "000000.mp4" in str(err.value)


def test_every_sample_failing_raises_the_first_error(dataset):
    shutil.rmtree(dataset / "mp4")
    with pytest.raises(DataError) as err:
        load_dataset(dataset)
    assert err.value.path == str(dataset / "mp4/zurich_00/000000.mp4")


def test_one_sample_names_the_file(pristine):
    row = {"id": "a/000009", "video_data": "mp4/a/000009.mp4", "event_data": "x.npy"}
    with pytest.raises(DataError) as err:
        sample_from_row(row, pristine, "1s", QUESTIONS)
    assert str(pristine / "mp4/a/000009.mp4") in str(err.value)
    with pytest.raises(DataError, match="lacks keys"):
        sample_from_row({"id": "a"}, pristine, "1s", QUESTIONS)


def test_bad_roots_and_indexes(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "missing_1s")
    empty = tmp_path / "empty_1s"
    empty.mkdir()
    with pytest.raises(DataError, match="exactly one"):
        load_dataset(empty)
    (empty / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable") as err:
        load_dataset(empty)
    assert str(empty / "index.json") in str(err.value)
    (empty / "index.json").write_text("[]")
    with pytest.raises(DataError, match="no rows"):
        load_dataset(empty)


def test_read_event_images(dataset):
    paths = [dataset / "event_image/zurich_00/000000_0.png"]
    (image,) = read_event_images(paths)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8 and (image == 255).all()
    paths[0].write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        read_event_images(paths)
    assert str(paths[0]) in str(err.value)
    with pytest.raises(DataError, match="not found"):
        read_event_images([dataset / "nope.png"])


def test_conf_data_entries(pristine):
    entries = {p.stem: OmegaConf.load(p) for p in sorted(CONF_DATA.glob("*.yaml"))}
    assert set(entries) >= {"synthetic_1s", "synthetic_500ms", "dsec_1s", "dsec_500ms"}
    for name in ("synthetic_1s", "synthetic_500ms", "dsec_1s", "dsec_500ms"):
        cfg = entries[name]
        assert set(cfg) >= {"layout", "root", "duration", "allow_pickle", "questions", "limit"}
        assert cfg.allow_pickle is False and cfg.duration == name.split("_")[1]
        assert cfg.layout == name.split("_")[0]
    for name in ("synthetic_1s", "synthetic_500ms"):   # the synthetic JSON answers exactly these
        assert list(entries[name].questions) == captions.questions()
        assert entries[name].root.endswith(name)
    assert OmegaConf.is_missing(entries["dsec_1s"], "root")
    with pytest.raises(DataError, match=r"data\.root="):
        load_from_config(entries["dsec_1s"])
    cfg = entries["dsec_1s"].copy()
    cfg.root, cfg.limit = str(pristine), 2
    samples, _ = load_from_config(cfg)
    assert len(samples) == 2 and samples[0].questions == list(cfg.questions)
