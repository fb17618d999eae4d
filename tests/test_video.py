"""The frame-index rule, decoding with PyAV, H.264 writing, and clear errors on bad videos."""

from __future__ import annotations

import numpy as np
import pytest
from specalign.data.video import decode_all_frames, frame_indices, read_video_frames, write_video

from specalign.errors import DataError


def gray_ramp(n: int, height: int = 32, width: int = 48) -> np.ndarray:
    """[n, H, W, 3] frames whose brightness identifies the frame: 10 + 20 * index."""
    levels = (10 + 20 * np.arange(n)).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, height, width, 3)).copy()


def frame_number(frame: np.ndarray) -> int:
    return round((float(frame.mean()) - 10) / 20)


def test_frame_indices_rule():
    assert frame_indices(20) == [0, 3, 5, 8, 11, 14, 16, 19]
    assert frame_indices(8) == list(range(8))
    assert frame_indices(10) == [0, 1, 3, 4, 5, 6, 8, 9]
    assert frame_indices(4) == [0, 0, 1, 1, 2, 2, 3, 3]   # short clips repeat frames
    assert frame_indices(1) == [0] * 8
    assert frame_indices(100, 3) == [0, 50, 99]
    for n in range(1, 60):
        idx = frame_indices(n)
        assert len(idx) == 8 and idx[0] == 0 and idx[-1] == n - 1
        assert (np.diff(idx) >= 0).all()
    with pytest.raises(ValueError):
        frame_indices(0)


def test_write_then_read_picks_the_rule_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, gray_ramp(12), fps=20)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]   # atomic: no temp file left
    assert len(decode_all_frames(path)) == 12
    frames = read_video_frames(path)
    assert frames.shape == (8, 32, 48, 3) and frames.dtype == np.uint8
    assert [frame_number(f) for f in frames] == frame_indices(12)


def test_short_clip_repeats_frames(tmp_path):
    path = tmp_path / "short.mp4"
    write_video(path, gray_ramp(3))
    assert [frame_number(f) for f in read_video_frames(path)] == [0, 0, 1, 1, 1, 1, 2, 2]


def test_writing_is_deterministic(tmp_path):
    frames = (np.random.default_rng(0).random((10, 48, 64, 3)) * 255).astype(np.uint8)
    write_video(tmp_path / "a.mp4", frames)
    write_video(tmp_path / "b.mp4", frames)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_write_rejects_odd_sizes_and_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", gray_ramp(2, height=31))
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "float.mp4", gray_ramp(2).astype(np.float32))


@pytest.mark.parametrize("content", [None, b"", np.random.default_rng(1).bytes(4096)],
                         ids=["missing", "empty", "random-bytes"])
def test_bad_video_gives_data_error_naming_the_file(tmp_path, content):
    path = tmp_path / "bad.mp4"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_video_frames(path)
    assert str(path) in str(err.value)


def test_truncated_video_without_frames(tmp_path):
    path = tmp_path / "cut.mp4"
    write_video(path, gray_ramp(5))
    path.write_bytes(path.read_bytes()[:64])   # header only
    with pytest.raises(DataError) as err:
        read_video_frames(path)
    assert str(path) in str(err.value)
