"""Drafters for the evaluator: load an exported drafter directory and turn it into proposers.

Token-only drafters (TokenAdapter) are scored from one teacher-forced pass per response,
which is exact for greedy rounds (see specdec/offline.py); EAGLE-3 is rerun round by
round, unrolling on its own hidden states as at inference.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from specalign.data.store import FeatureStore, Row
from specalign.specdec.metrics import Proposer
from specalign.specdec.offline import teacher_forced_proposer

from specalign.errors import DataError, StoreMismatch

Entries = tuple[dict[str, Callable[[Row], Proposer]], dict[str, Callable[[Row], torch.Tensor]], list[str]]


def drafter_config(path: str | Path) -> dict:
    p = Path(path) / "config.json"
    if not p.exists():
        raise DataError(p, "not an exported drafter (config.json missing)", "run `specalign export run=RUN out=DIR`")
    return json.loads(p.read_text())


def drafter_entries(path: str | Path, store: FeatureStore, rows: list[Row], name: str | None = None,
                    allow_ablation: bool = True) -> Entries:
    """-> ({name: row -> Proposer}, {name: row -> log-probs [n, V]}, notes)."""
    from specalign.adapters.eagle3 import Eagle3Drafter
    from specalign.adapters.export_format import load_drafter
    from specalign.adapters.token_adapter import TokenAdapter

    model = load_drafter(path)
    kind = drafter_config(path).get("drafter_type", type(model).__name__)
    name = name or "drafter"
    if isinstance(model, TokenAdapter):
        return _token_adapter_entries(model, name, allow_ablation)
    if isinstance(model, Eagle3Drafter):
        return _eagle3_entries(model, store, name)
    raise DataError(path, f"unknown drafter type {kind!r}")


# ---------------------------------------------------------------------------------------
# TokenAdapter


@torch.no_grad()
def token_adapter_logprobs(model, row: Row, keep_draft: bool = True) -> torch.Tensor:
    """Teacher-forced log-probs [n, V]; row j is the proposal distribution after r[:j]."""
    dev = model.head.weight.device
    draft = row.draft_tokens[: model.config.max_len] or [0]
    d = torch.tensor([draft], device=dev)
    d_len = torch.tensor([len(row.draft_tokens[: model.config.max_len])], device=dev)
    t = torch.tensor([row.target_tokens], device=dev)
    keep = torch.tensor([keep_draft], device=dev)
    return model.logits(d, d_len, t, keep)[0].float()


def _token_adapter_proposer(model, row: Row, keep_draft: bool) -> Proposer:
    if len(row.target_tokens) <= model.config.max_len:
        return teacher_forced_proposer(token_adapter_logprobs(model, row, keep_draft).argmax(-1).tolist())
    draft = row.draft_tokens if keep_draft else []
    return lambda p, gamma: model.propose(draft, row.target_tokens[:p], gamma)


def _token_adapter_entries(model, name: str, allow_ablation: bool) -> Entries:
    props = {name: lambda r: _token_adapter_proposer(model, r, True)}
    logits = {name: lambda r: token_adapter_logprobs(model, r, True)}
    notes = []
    if model.config.condition_on_draft and allow_ablation:
        ab = "no_draft"
        props[ab] = lambda r: _token_adapter_proposer(model, r, False)
        logits[ab] = lambda r: token_adapter_logprobs(model, r, False)
        notes.append("'no_draft': the same weights with the draft segment removed (the model was trained with "
                     "draft dropout); pass no_draft=DIR for a separately trained ablation.")
    return props, logits, notes


# ---------------------------------------------------------------------------------------
# EAGLE-3


def _eagle3_entries(model, store: FeatureStore, name: str) -> Entries:
    from specalign.adapters.eagle3 import fuse_features

    missing = [n for n in model.config.feature_names if n.rsplit(".", 1)[0] not in ("target", "draft")
               or (n.split(".", 1)[1] != "final" and int(n.split(".h", 1)[1]) not in store.layers(n.split(".")[0]))]
    if not store.has_hidden or missing:
        raise StoreMismatch(f"{store.root}: this EAGLE-3 drafter reads {model.config.feature_names}, which the store "
                            "does not have; evaluate it on a store from `specalign extract` with the same models")

    def feats(row: Row) -> torch.Tensor:
        return fuse_features(lambda n: store.hidden(row, n), model.config.feature_names)

    def proposer(row: Row) -> Proposer:
        f, toks = feats(row), row.target_tokens
        return lambda p, gamma: model.propose(f, toks[:p], gamma)

    def logprobs(row: Row) -> torch.Tensor:
        return torch.nan_to_num(model.logits(feats(row), row.target_tokens).float(), nan=float("-inf"))

    notes = [(f"'{name}': EAGLE-3 on {model.config.feature_source} features; its first round of each response "
              "proposes nothing (no accepted token to embed yet), as EAGLE's prefill.")]
    return {name: proposer}, {name: logprobs}, notes
