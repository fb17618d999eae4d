"""Video clips: the target model's frame-index rule, decoding with PyAV, H.264 writing."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

from specalign.errors import DataError
from specalign.io import atomic_path

TARGET_FRAMES = 8  # Video-LLaVA takes 8 frames


def frame_indices(n_available: int, n_wanted: int = TARGET_FRAMES) -> list[int]:
    """THE frame-index rule: `n_wanted` uniformly spaced indices over [0, n_available - 1].

    Indices are np.linspace(0, n_available - 1, n_wanted) rounded with np.rint (halves to
    even), so the first and the last frame are always taken; a clip with fewer frames than wanted
    repeats frames (e.g. 4 available, 8 wanted -> [0, 0, 1, 1, 2, 2, 3, 3]).
    """
    if n_available < 1:
        raise ValueError("a clip needs at least one frame")
    if n_wanted < 1:
        raise ValueError(f"n_wanted must be >= 1, got {n_wanted}")
    return np.rint(np.linspace(0, n_available - 1, n_wanted)).astype(int).tolist()


def read_video_frames(path: str | Path, n_frames: int = TARGET_FRAMES) -> np.ndarray:
    """Decode the first video stream of `path`; return `frame_indices` frames as [n, H, W, 3] uint8 RGB."""
    frames = decode_all_frames(path)
    return frames[frame_indices(len(frames), n_frames)]


def decode_all_frames(path: str | Path) -> np.ndarray:
    """Every frame of the first video stream of `path`, as [T, H, W, 3] uint8 RGB."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "video file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(path, "the file has no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]
    except av.FFmpegError as e:
        raise DataError(path, f"cannot decode video: {e}", "the file is corrupt or not a video") from None
    if not frames:
        raise DataError(path, "the video has no frames")
    return np.stack(frames)


def write_video(path: str | Path, frames: np.ndarray, fps: int = 20, crf: int = 18) -> None:
    """Write [T, H, W, 3] uint8 RGB frames (H, W even) as H.264 (libx264, yuv420p) mp4, atomically."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected [T, H, W, 3] uint8 frames with T >= 1, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {width}x{height}")
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # x264's macroblock-tree rate control is not bit-reproducible on tiny frames; off, so a
        # seed gives the same bytes
        stream.options = {"crf": str(crf), "x264-params": "mbtree=0"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
