"""Offline simulation of greedy speculative decoding over a feature store.

For greedy decoding the whole process is fixed by the target's greedy response r, so the
rounds can be replayed exactly without the 7B target (design.md).

A drafter whose proposals depend only on tokens (raw draft tokens, the TokenAdapter, the
draft model itself) needs no round-by-round rerun: within a round, proposal k matters only
if proposals 0..k-1 were accepted, i.e. equal to r[p..p+k-1], and then the drafter's
input is exactly the target prefix r[:p+k]. So its greedy proposal at position j is its
teacher-forced prediction after r[:j], and `teacher_forced_proposer` is exact. Drafters that
feed back their own hidden states (EAGLE-3) are rerun round by round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from specalign.data.store import FeatureStore, Row
from specalign.specdec.metrics import (
    Acceptance,
    Proposer,
    expected_accept,
    raw_draft_proposer,
    simulate_greedy,
)


def teacher_forced_proposer(predictions: Sequence[int]) -> Proposer:
    """predictions[j] = the drafter's greedy token after the target prefix r[:j]."""
    preds = [int(t) for t in predictions]
    return lambda p, gamma: preds[p: p + gamma]


def head_predictions(store: FeatureStore, row: Row, model: str) -> torch.Tensor:
    """Greedy next-token ids of `model` ("target" or "draft") at every feature row: [n]."""
    return head_logits(store, row, model).argmax(-1)


def head_logits(store: FeatureStore, row: Row, model: str, heads: dict | None = None) -> torch.Tensor:
    """Logits recomputed from the stored final-norm rows and LM head: [n, V]."""
    heads = heads if heads is not None else store.heads()
    final = store.hidden(row, f"{model}.final").float()
    return final @ heads[f"{model}.lm_head"].float().T


def acceptances(rows: Iterable[Row], make: Callable[[Row], Proposer], gammas: Sequence[int],
                group: Callable[[Row], str | None] | None = None,
                rounds_out: dict[int, list] | None = None) -> dict[str, dict[int, Acceptance]]:
    """{"all" | group: {gamma: Acceptance}}. Each row's proposer is built once (one drafter pass)
    and serves every gamma and its group's table. `rounds_out` collects {gamma: per row its rounds}."""
    tables: dict[str, dict[int, Acceptance]] = {}
    for row in rows:
        propose = make(row)
        keys = {"all"} | ({group(row)} if group and group(row) else set())
        for g in gammas:
            rounds = simulate_greedy(row.target_tokens, propose, g)
            if rounds_out is not None:
                rounds_out.setdefault(g, []).append(rounds)
            for k in keys:
                tables.setdefault(k, {}).setdefault(g, Acceptance(g)).add_sample(rounds)
    return tables


def baseline_proposers(store: FeatureStore) -> dict[str, Callable[[Row], Proposer]]:
    """The baselines every report shows: the raw draft tokens, and (full stores) the draft model
    used as an ordinary draft model; stored token lists from earlier research are scored too."""
    out: dict[str, Callable[[Row], Proposer]] = {"raw_draft": lambda r: raw_draft_proposer(r.draft_tokens)}
    if store.has_hidden:
        out["draft_model"] = lambda r: teacher_forced_proposer(head_predictions(store, r, "draft").tolist())
    extra_lists = sorted({k for r in store.rows for k, v in r.extra.items()
                          if k.endswith("_tokens") and isinstance(v, list)})
    for k in extra_lists:
        out[f"stored:{k}"] = lambda r, k=k: raw_draft_proposer(r.extra.get(k, []))
    return out


def expected_sampling_acceptance(store: FeatureStore, rows: Iterable[Row],
                                 drafter_logits: Callable[[Row], torch.Tensor], temperature: float = 1.0) -> float:
    """Mean over response positions of sum_x min(p(x), q(x)), p the target's and q the drafter's
    distribution at temperature T (the acceptance probability of one speculative-sampling step)."""
    total, count = 0.0, 0
    for row in rows:
        p = torch.softmax(head_logits(store, row, "target") / temperature, -1)
        q = torch.nan_to_num(torch.softmax(drafter_logits(row).float() / temperature, -1), nan=0.0)
        v = min(p.shape[-1], q.shape[-1])
        p, q = p[:, :v], q[:, :v]
        total += float(expected_accept(p, q).sum())
        count += p.shape[0]
    return total / max(count, 1)
