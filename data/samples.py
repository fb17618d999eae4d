"""Typed samples: what every reader returns and every consumer takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Sample:
    """One clip of a DSEC-clip dataset (docs/design.md, "Datasets on disk")."""

    id: str                                   # unique within the dataset, e.g. "interlaken_00_a/000012"
    split: str | None                         # split given by the dataset JSON, if any
    duration: str                             # "1s" | "500ms"
    video_path: Path                          # mp4 for the target
    event_images: list[Path] = field(default_factory=list)  # EventGPT frames for the draft
    event_path: Path | None = None            # raw events (.npy / .h5), if present
    questions: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # e.g. synthetic ground truth, reference captions


@dataclass
class Request:
    """One (sample, question) pair: the unit of extraction, one row of the feature store."""

    sample: Sample
    question_id: int
    question: str

    @property
    def key(self) -> str:
        return f"{self.sample.id}#{self.question_id}"


def requests_of(samples: list[Sample]) -> list[Request]:
    """Every (sample, question) pair, questions numbered in each sample's own order."""
    return [Request(s, qid, q) for s in samples for qid, q in enumerate(s.questions)]
