"""Raw event I/O (safe pickle decoding, .npy / .h5) and the EventGPT event-frame renderer."""

from __future__ import annotations

import pathlib

import h5py
import numpy as np
import pytest
from specalign.data.events import (
    EVENT_DTYPE,
    chunk_bounds,
    load_events,
    read_event_clip,
    render_event_frames,
    save_event_clip,
)

from specalign.errors import DataError

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_EVENTS = SHARED_DATA / "eventgpt_sample_50ms.npy"
needs_real = pytest.mark.skipif(not REAL_EVENTS.is_file(),
                                reason=f"real EventGPT sample not found at {REAL_EVENTS}")

WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def make_events(n: int, width: int = 16, height: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ev = np.empty(n, EVENT_DTYPE)
    ev["x"], ev["y"] = rng.integers(0, width, n), rng.integers(0, height, n)
    ev["t"], ev["p"] = np.sort(rng.integers(0, 10_000, n)), rng.integers(0, 2, n)
    return ev


def save_pickled_dict(path: pathlib.Path, record) -> None:
    """EventGPT's format: a 0-d object array holding `record` (normally a dict)."""
    holder = np.empty((), dtype=object)
    holder[()] = record
    np.save(path, holder, allow_pickle=True)


def last_polarity_by_pixel(chunk: np.ndarray) -> dict[tuple[int, int], int]:
    """Reference for the renderer: walk the chunk in order, the last event at a pixel wins."""
    last = {}
    for x, y, p in zip(chunk["x"].tolist(), chunk["y"].tolist(), chunk["p"].tolist()):
        last[(y, x)] = p
    return last


# ---------------------------------------------------------------------------- real data

@needs_real
def test_real_file_decodes_without_unpickling_code():
    clip = read_event_clip(REAL_EVENTS)
    ev = clip.events
    assert ev.dtype == EVENT_DTYPE and len(ev) == 132_268
    assert (np.diff(ev["t"]) >= 0).all()
    assert ev["x"].max() < 640 and ev["y"].max() < 480
    assert set(np.unique(ev["p"])) == {0, 1}
    assert 45_000 < ev["t"][-1] - ev["t"][0] <= 50_000   # about 50 ms


@needs_real
def test_render_real_recording():
    ev = load_events(REAL_EVENTS)
    n_frames = 5
    frames = render_event_frames(ev, n_frames, 480, 640)
    bounds = chunk_bounds(len(ev), n_frames)
    size = len(ev) // n_frames
    assert [b - a for a, b in bounds] == [size] * (n_frames - 1) + [len(ev) - size * (n_frames - 1)]
    assert bounds[0][0] == 0 and bounds[-1][1] == len(ev)
    for frame, (a, b) in zip(frames, bounds):
        assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
        colors = {tuple(c) for c in np.unique(frame.reshape(-1, 3), axis=0)}
        assert colors <= {WHITE, RED, BLUE}
        expected = np.full((480, 640, 3), 255, np.uint8)
        for (y, x), p in last_polarity_by_pixel(ev[a:b]).items():
            expected[y, x] = RED if p == 1 else BLUE
        np.testing.assert_array_equal(frame, expected)


# ---------------------------------------------------------------------------- renderer

def test_chunk_bounds_rule():
    assert chunk_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert chunk_bounds(9, 3) == [(0, 3), (3, 6), (6, 9)]
    assert chunk_bounds(2, 3) == [(0, 0), (0, 0), (0, 2)]
    with pytest.raises(ValueError):
        chunk_bounds(10, 0)


def test_later_events_overwrite_earlier_at_duplicate_pixels():
    ev = make_events(2_000, width=3, height=2, seed=1)   # every pixel hit hundreds of times
    (frame,) = render_event_frames(ev, 1, 2, 3)
    for (y, x), p in last_polarity_by_pixel(ev).items():
        assert tuple(frame[y, x]) == (RED if p == 1 else BLUE)


def test_untouched_pixels_stay_white_and_canvas_checked():
    ev = make_events(1, seed=2)
    ev["x"], ev["y"], ev["p"] = 4, 3, 0
    (frame,) = render_event_frames(ev, 1, 12, 16)
    assert tuple(frame[3, 4]) == BLUE
    assert (frame.reshape(-1, 3) == 255).all(axis=1).sum() == 12 * 16 - 1
    with pytest.raises(ValueError, match="outside"):
        render_event_frames(ev, 1, 3, 4)


# ---------------------------------------------------------------------------- safe decoding

class _Evil:
    """Unpickling this would create `marker` (a stand-in for arbitrary code)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.npy"
    ev = make_events(10)
    save_pickled_dict(evil, {k: ev[k] for k in "xytp"} | {"payload": _Evil(marker)})
    with pytest.raises(DataError) as err:
        load_events(evil)
    assert not marker.exists()
    assert str(evil) in str(err.value)
    assert "allow_pickle" in str(err.value) and "Path" in str(err.value)
    np.load(evil, allow_pickle=True)   # the file really is malicious: trusting it runs the payload
    assert marker.exists()


def test_benign_pickled_dict_loads_safely_and_when_trusted(tmp_path):
    path = tmp_path / "ok.npy"
    ev = make_events(50)
    meta = {"height": np.int64(12), "width": 16, "name": "clip"}   # numpy scalars decode too
    save_pickled_dict(path, {k: ev[k] for k in "xytp"} | meta)
    for trusted in (False, True):
        clip = read_event_clip(path, allow_pickle=trusted)
        np.testing.assert_array_equal(clip.events, ev)
        assert clip.meta == {"height": 12, "width": 16, "name": "clip"}


def test_save_event_clip_roundtrip_in_eventgpt_format(tmp_path):
    path = tmp_path / "seq" / "000001.npy"
    ev = make_events(100)
    save_event_clip(path, ev, {"height": 12, "width": 16, "t_start_us": 0, "t_end_us": 10_000})
    raw = np.load(path, allow_pickle=True)
    assert raw.shape == () and raw.dtype == object and set("xytp") <= set(raw.item())
    clip = read_event_clip(path)
    np.testing.assert_array_equal(clip.events, ev)
    assert clip.meta == {"height": 12, "width": 16, "t_start_us": 0, "t_end_us": 10_000}
    assert [p.name for p in path.parent.iterdir()] == ["000001.npy"]   # no temp files left


def test_uint16_timestamps_of_real_format_are_widened(tmp_path):
    path = tmp_path / "u16.npy"
    ev = make_events(20)
    save_pickled_dict(path, {"x": ev["x"], "y": ev["y"], "t": ev["t"].astype(np.uint16), "p": ev["p"]})
    assert load_events(path)["t"].dtype == np.int64


# ---------------------------------------------------------------------------- other formats

def test_structured_npy_is_read_and_sorted(tmp_path):
    path = tmp_path / "plain.npy"
    ev = make_events(30)
    np.save(path, ev[::-1])
    np.testing.assert_array_equal(load_events(path)["t"], ev["t"])


def test_dsec_h5(tmp_path):
    path = tmp_path / "events.h5"
    ev = make_events(40)
    with h5py.File(path, "w") as f:
        for k in "xytp":
            f[f"events/{k}"] = ev[k].astype(np.uint32 if k == "t" else ev.dtype[k])
        f["t_offset"] = 123
    clip = read_event_clip(path)
    np.testing.assert_array_equal(clip.events, ev)
    assert clip.meta == {"t_offset": 123}


# ---------------------------------------------------------------------------- bad inputs

def test_missing_file(tmp_path):
    path = tmp_path / "nope.npy"
    with pytest.raises(DataError, match="not found") as err:
        load_events(path)
    assert str(path) in str(err.value)


def test_empty_event_file(tmp_path):
    path = tmp_path / "empty.npy"
    save_event_clip(path, np.empty(0, EVENT_DTYPE))
    with pytest.raises(DataError, match="no events") as err:
        load_events(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content, problem", [
    ({"x": np.zeros(3), "y": np.zeros(3), "t": np.zeros(3)}, "missing event fields"),
    ({"x": np.zeros(3), "y": np.zeros(2), "t": np.zeros(3), "p": np.zeros(3)}, "equal length"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(3), "t": np.zeros(3), "p": np.zeros(3)}, "equal length"),
    ([1, 2, 3], "pickled dict"),
])
def test_malformed_pickled_content(tmp_path, content, problem):
    path = tmp_path / "bad.npy"
    save_pickled_dict(path, content)
    with pytest.raises(DataError, match=problem) as err:
        load_events(path)
    assert str(path) in str(err.value)


def test_garbage_and_unstructured_files(tmp_path):
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(np.random.default_rng(0).bytes(500))
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((4, 4)))
    h5 = tmp_path / "noevents.h5"
    with h5py.File(h5, "w") as f:
        f["other"] = 1
    other = tmp_path / "events.txt"
    other.write_text("1 2 3 4")
    for path in (garbage, plain, h5, other):
        with pytest.raises(DataError) as err:
            load_events(path)
        assert str(path) in str(err.value)


# ---------------------------------------------------------------------------- validation

def _record(**changes):
    base = {"x": np.array([1, 2, 3], np.uint16), "y": np.array([1, 2, 3], np.uint16),
            "t": np.array([0, 10, 20], np.int64), "p": np.array([0, 1, 1], np.uint8)}
    return {**base, **{k: np.asarray(v) for k, v in changes.items()}}


@pytest.mark.parametrize("changes, problem", [
    ({"t": [0.0, np.nan, 20.0]}, r"event field t holds 1 NaN or infinite values \(first at event 1\)"),
    ({"t": [0.0, 10.0, np.inf]}, r"event field t holds 1 NaN or infinite values \(first at event 2\)"),
    ({"y": [1, 70000, 3]}, r"event field y = 70000 at event 1 is outside the sensor \(0 <= y < 65536\)"),
    ({"x": [-1, 2, 3]}, r"event field x = -1 at event 0 is outside the sensor"),
    ({"x": [1.5, 2.0, 3.0]}, r"event field x holds non-integer values \(event 0: 1.5\)"),
    ({"x": [1.0, np.nan, 3.0]}, r"event field x holds 1 NaN"),
    ({"p": [0, 2, 1]}, r"event polarity must be in \{0, 1\} or \{-1, 1\}, found \[2\]"),
    ({"p": [-1, 0, 1]}, r"event polarity must be in .* beside both 0 and -1"),
    ({"x": [1, 2, 64], "width": 64, "height": 48}, r"event field x = 64 at event 2 is outside the sensor \(0 <= x < 64\)"),
])
def test_invalid_event_arrays_are_refused_naming_the_file(tmp_path, changes, problem):
    """NaN or inf timestamps became INT64_MIN and y = 70000 wrapped to 4464 when cast to the packed dtype."""
    path = tmp_path / "clip.npy"
    save_pickled_dict(path, _record(**changes))
    with pytest.raises(DataError, match=rf"^{path}: {problem}"):
        load_events(path)


def test_sensor_argument_bounds_files_without_their_size(tmp_path):
    path = tmp_path / "dsec.npy"
    save_pickled_dict(path, _record(y=[1, 479, 480]))
    with pytest.raises(DataError, match=r"y = 480 at event 2 is outside the sensor \(0 <= y < 480\)"):
        load_events(path, sensor=(640, 480))
    assert len(load_events(path)) == 3          # without a sensor size only the packed range applies


def test_minus_one_polarity_and_unsorted_time_are_accepted(tmp_path, caplog):
    path = tmp_path / "clip.npy"
    save_pickled_dict(path, _record(t=[20, 0, 10], p=[-1, 1, -1]))
    with caplog.at_level("WARNING"):
        ev = load_events(path)
    assert ev["t"].tolist() == [0, 10, 20] and ev["p"].tolist() == [1, 0, 0]
    assert "not in order; sorted them" in caplog.text
