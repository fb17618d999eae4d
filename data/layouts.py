"""Dataset layouts: `data.layout` (conf/data/*.yaml) says how a dataset lies on disk, and so which reader
reads it.

    dsec        DSEC clips in the DSEC-clip layout EventGPT ships (data/dsec.py)
    synthetic   the synthetic world (data/synth.py): the same DSEC-clip layout, each row also holding its
                ground truth and reference answers (data/dsec.py reads it)

A reader takes (root, questions=, limit=, strict=, duration=) and returns (samples, errors) as
`data.dsec.load_dataset` does. A third layout is its reader, a conf/data entry and a line in LAYOUTS.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

from omegaconf.errors import MissingMandatoryValue
from specalign.data.samples import Sample

from specalign.errors import DataError

LAYOUTS = {"dsec": "specalign.data.dsec:load_dataset", "synthetic": "specalign.data.dsec:load_dataset"}
DEFAULT_LAYOUT = "dsec"        # stores and configs written before `layout` existed


def reader(layout: str | None) -> Callable[..., tuple[list[Sample], list[dict]]]:
    layout = layout or DEFAULT_LAYOUT
    if layout not in LAYOUTS:
        raise DataError("data.layout", f"unknown dataset layout {layout!r}", f"one of {', '.join(LAYOUTS)}")
    module, name = LAYOUTS[layout].split(":")
    return getattr(importlib.import_module(module), name)


def load_from_config(data_cfg: Mapping) -> tuple[list[Sample], list[dict]]:
    """The samples of a conf/data entry (layout, root, duration, questions, limit, strict) and the rows
    that failed to read."""
    try:
        root = data_cfg["root"]
    except MissingMandatoryValue:
        raise DataError("data.root", "no dataset root configured",
                        "pass data.root=/path/to/<name>_1s on the command line") from None
    questions = data_cfg.get("questions")
    return reader(data_cfg.get("layout"))(root, questions=list(questions) if questions is not None else None,
                                          limit=data_cfg.get("limit"), strict=bool(data_cfg.get("strict", False)),
                                          duration=data_cfg.get("duration"))


def dataset_entry(data_cfg: Mapping) -> dict:
    """What a store's manifest records of a dataset it was extracted from (`load_recorded` reads it back)."""
    return {"root": str(data_cfg["root"]), "duration": data_cfg.get("duration"),
            "layout": data_cfg.get("layout") or DEFAULT_LAYOUT}


def load_recorded(record: Mapping, questions: list[str] | None) -> list[Sample]:
    """The samples of a dataset recorded in a store's manifest, with the store's questions."""
    return reader(record.get("layout"))(record["root"], questions=questions, duration=record.get("duration"))[0]
