"""Readers for the DSEC-clip layout (docs/design.md, "Datasets on disk").

    <root>/                       e.g. .../synthetic_1s or .../dsec_500ms
        <root.name>.json          rows {id, split, event_data, video_data, event_image: [...],
                                  conversations: [...], ...}; paths relative to <root>
        event_npy/<seq>/<clip:06d>.npy
        event_image/<seq>/<clip:06d>_<k>.png
        mp4/<seq>/<clip:06d>.mp4

The index JSON is `<root>/<root.name>.json`, or the only `*.json` in <root>. Keys of a row
beyond the standard ones (e.g. the synthetic world's `ground_truth`, `references`) go to
`Sample.meta`. A row's questions are the human turns of its `conversations` with the
`<event>`/`<video>`/`<image>` placeholders removed, unless a question list is given
(config `data.questions`), which then applies to every sample.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from specalign.data.samples import Sample
from specalign.data.store import split_of

from specalign.errors import DataError
from specalign.io import atomic_path

ROW_KEYS = ("id", "split", "event_data", "video_data", "event_image", "conversations")
REQUIRED_KEYS = ("id", "video_data")
PLACEHOLDERS = re.compile(r"<(event|video|image)>\s*")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s)")


def duration_seconds(duration: str) -> float:
    """Seconds of a duration label: "1s" -> 1.0, "500ms" -> 0.5."""
    match = _DURATION.fullmatch(duration.strip())
    if not match:
        raise ValueError(f"not a duration label: '{duration}' (expected e.g. '1s' or '500ms')")
    value, unit = float(match[1]), match[2]
    return value / 1000 if unit == "ms" else value


def duration_of_root(root: str | Path) -> str:
    """The duration label a dataset directory's name ends with: ".../dsec_500ms" -> "500ms"."""
    root = Path(root)
    match = re.search(r"_(\d+(?:\.\d+)?(?:ms|s))$", root.name)
    if not match:
        raise DataError(root, "cannot tell the clip duration from the directory name",
                        "name it like '<name>_1s' / '<name>_500ms' or set data.duration")
    return match[1]


def index_path(root: str | Path) -> Path:
    """The dataset's index JSON: `<root>/<root.name>.json`, else the only *.json in root."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset directory not found", "set data.root to a DSEC-clip dataset")
    own = root / f"{root.name}.json"
    if own.is_file():
        return own
    candidates = sorted(root.glob("*.json"))
    if len(candidates) != 1:
        found = [c.name for c in candidates] or "none"
        raise DataError(root, f"expected {own.name} or exactly one *.json index, found {found}")
    return candidates[0]


def read_rows(root: str | Path) -> tuple[Path, list[dict]]:
    """The index JSON's path and its list of rows."""
    path = index_path(root)
    try:
        rows = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"unreadable index JSON: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(path, "the index JSON must be a list of row objects")
    return path, rows


def sample_from_row(row: dict, root: str | Path, duration: str,
                    questions: list[str] | None = None) -> Sample:
    """One typed Sample; DataError naming the file when a row is malformed or a file is missing."""
    root = Path(root)
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise DataError(root, f"row {row.get('id', '?')!r} lacks keys {missing}")
    video = _existing(root, row["video_data"])
    images = [_existing(root, p) for p in row.get("event_image") or []]
    events = _existing(root, row["event_data"]) if row.get("event_data") else None
    if events is None and not images:
        raise DataError(root, f"row {row['id']!r} has neither event_data nor event_image")
    qs = list(questions) if questions is not None else questions_of(row.get("conversations") or [])
    if not qs:
        raise DataError(root, f"row {row['id']!r} has no questions",
                        "give data.questions or human turns in conversations")
    return Sample(id=sample_id(row["id"], duration), split=row.get("split") or split_of(str(row["id"])),
                  duration=duration, video_path=video,
                  event_images=images, event_path=events, questions=qs,
                  meta={k: v for k, v in row.items() if k not in ROW_KEYS})


def sample_id(row_id, duration: str) -> str:
    """Ids are unique across durations ("1s/<seq>/<clip>"); the split is decided per clip, so the
    1 s and 500 ms versions of a clip always land in the same split."""
    return f"{duration}/{row_id}"


def questions_of(conversations: list[dict]) -> list[str]:
    """The human turns of a LLaVA-style conversation, without media placeholders."""
    return [PLACEHOLDERS.sub("", str(turn.get("value", ""))).strip()
            for turn in conversations if turn.get("from") == "human"]


def load_dataset(root: str | Path, questions: list[str] | None = None, limit: int | None = None,
                 strict: bool = False, duration: str | None = None) -> tuple[list[Sample], list[dict]]:
    """Read a DSEC-clip dataset as typed Samples, skipping-and-recording broken rows.

    Returns (samples, errors) with errors [{id, path, reason, requests}] (`requests`: how many (clip,
    question) requests the broken row stands for). `questions` overrides the rows' own; `duration` defaults to the directory name's suffix; `limit` keeps the first
    rows of the index. `strict=True` raises the first error instead of skipping; a dataset
    in which every row fails raises its first error either way.
    """
    root = Path(root)
    duration = duration or duration_of_root(root)
    index, rows = read_rows(root)
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise DataError(index, "the dataset has no rows")
    samples, errors, first_error = [], [], None
    for row in rows:
        try:
            samples.append(sample_from_row(row, root, duration, questions))
        except DataError as e:
            if strict:
                raise
            first_error = first_error or e
            n = len(questions) if questions is not None else len(questions_of(row.get("conversations") or []))
            errors.append({"id": sample_id(row.get("id", "?"), duration), "path": e.path, "reason": e.problem,
                           "requests": max(n, 1)})
    if not samples:
        raise first_error
    return samples, errors


class EventCheck:
    """Reads and validates each clip's raw events once (data.events: finite, inside the sensor, polarity,
    order), so that extraction skips and records a clip whose event file is damaged even though its
    event frames are already rendered."""

    def __init__(self, allow_pickle: bool = False, sensor=None):
        self.allow_pickle, self.sensor = allow_pickle, tuple(sensor) if sensor else None
        self.seen: dict[str, DataError | None] = {}

    def __call__(self, sample: Sample) -> DataError | None:
        """The sample's event-file error, or None (no event file, or a valid one)."""
        if sample.id not in self.seen:
            from specalign.data.events import read_event_clip

            try:
                if sample.event_path is not None:
                    read_event_clip(sample.event_path, self.allow_pickle, self.sensor)
                self.seen[sample.id] = None
            except DataError as e:
                self.seen[sample.id] = e
        return self.seen[sample.id]

    @classmethod
    def of(cls, data_cfg) -> EventCheck:
        return cls(bool(data_cfg.get("allow_pickle", False)), data_cfg.get("sensor"))


def read_event_images(paths: list[str | Path]) -> list[np.ndarray]:
    """Load event frames (PNG) as [H, W, 3] uint8 RGB arrays."""
    images = []
    for path in map(Path, paths):
        if not path.is_file():
            raise DataError(path, "event image not found")
        try:
            with Image.open(path) as im:
                images.append(np.asarray(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(path, f"unreadable image: {e}") from None
    return images


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write an [H, W, 3] uint8 RGB image as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _existing(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise DataError(path, "file listed in the dataset index is missing")
    return path
