"""The drafters a report shows, from exported drafter directories: one list for both modes (offline:
specdec/evaluate.py, online: specdec/online_eval.py).

    drafter     the drafter at `drafter=DIR`
    no_draft    its ablation without the draft: the drafter at `no_draft=DIR` when given, else the
                variant of the drafter's own weights its type makes (the TokenAdapter without its draft
                segment), if it has one

Each is found through its registered type (adapters/registry.py), which says how to batch its inputs
offline, what it reads online and what the report notes about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from specalign.adapters.registry import DrafterType, type_of
from torch import nn


@dataclass
class ReportDrafter:
    """One drafter of a report: a model, its type and the options of the variant it is run as."""

    name: str
    model: nn.Module
    kind: DrafterType
    options: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_report_drafters(path: str | Path, name: str, mode: str, with_variants: bool = True,
                         device: str | torch.device = "cpu") -> list[ReportDrafter]:
    """The drafter directory at `path` shown as `name`, and (with_variants) the variants of its type."""
    from specalign.adapters.export_format import load_drafter

    model = load_drafter(path, device)
    kind = type_of(model)
    out = [ReportDrafter(name, model, kind, {}, kind.notes(model, name, mode))]
    if with_variants:
        out += [ReportDrafter(v_name, model, kind, v.options, [v.note])
                for v_name, v in kind.variants(model).items()]
    return out


def report_drafters(drafter: str | Path | None, no_draft: str | Path | None, mode: str,
                    device: str | torch.device = "cpu") -> list[ReportDrafter]:
    """`drafter` (as "drafter") with its own variants unless `no_draft` is given, then `no_draft`."""
    out = []
    if drafter:
        out += load_report_drafters(drafter, "drafter", mode, with_variants=not no_draft, device=device)
    if no_draft:
        out += load_report_drafters(no_draft, "no_draft", mode, with_variants=False, device=device)
    return out
