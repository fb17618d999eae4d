"""When EventGPT's tokens exist: the draft schedules a draft-reading drafter assumes (docs/design.md, §10).

    sequential  EventGPT generates its whole response before the target starts; every round sees all of it,
                and its generation is paid up front (the drafter's setup).
    concurrent  EventGPT decodes beside the target (its own device or CUDA stream), both starting at time 0;
                a round sees only the EventGPT tokens that exist when it starts, and nothing is paid up front.

Under `concurrent`, with per-call costs c (seconds, `StreamCosts`), round i (0-based) starts at

    t_i = c.target_prefill + i (c.verify + c.round)

and EventGPT has produced k(t) = 0 tokens before its prefill ends, then 1 + floor((t - c.draft_prefill) /
c.draft_step) (the prefill yields the first token: the rule of "prefill hiding"), capped at its response
length. `visible_length(i)` is that count at t_i: a function of the round index alone, so the offline walk,
training and the online engine read the same numbers. Defaults are the measured H200 costs of
bench/specdec.py (README, "Speculative decoding"); the tiny world's pipeline sets its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor

from specalign.errors import SpecalignError

SEQUENTIAL, CONCURRENT = "sequential", "concurrent"
DRAFT_SCHEDULES = {"full": SEQUENTIAL, "streaming": CONCURRENT}   # adapter.draft_schedule -> the schedule


@dataclass(frozen=True)
class StreamCosts:
    """Per-call seconds: the target's prefill, decode step and verification of gamma + 1 tokens, the drafter's
    proposal (one round), EventGPT's prefill and decode step."""

    target_prefill_s: float = 0.0629
    target_decode_s: float = 0.00579
    verify_s: float = 0.0069
    round_s: float = 0.00118
    draft_prefill_s: float = 0.0466
    draft_step_s: float = 0.00559

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "adapter.stream_costs") -> StreamCosts:
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SpecalignError(f"{where}: unknown keys {unknown}; the keys are {sorted(names)}")
        bad = [k for k, v in d.items() if not isinstance(v, (int, float)) or not v >= 0 or not math.isfinite(v)]
        if bad or float(d.get("draft_step_s", 1.0)) == 0.0:
            raise SpecalignError(f"{where}: {bad or ['draft_step_s']} must be finite seconds, the draft step "
                                 "above 0; give the costs bench/specdec.py or an online report measures")
        return cls(**{k: float(v) for k, v in d.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def round_period_s(self) -> float:
        """One round of the target: a verification and the drafter's proposal."""
        return self.verify_s + self.round_s


def draft_tokens_by(costs: StreamCosts, t: float) -> int:
    """EventGPT tokens that exist at time t (seconds since both models started), its response unbounded."""
    if t < costs.draft_prefill_s:
        return 0
    return 1 + math.floor((t - costs.draft_prefill_s) / costs.draft_step_s + 1e-9)  # 1e-9: exact multiples


def round_start_s(costs: StreamCosts, i: int) -> float:
    """When round i (0-based) starts under the concurrent schedule."""
    return costs.target_prefill_s + i * costs.round_period_s


def visible_length(costs: StreamCosts, i: int, draft_len: int | None = None) -> int:
    """EventGPT tokens round i sees under the concurrent schedule (at most draft_len)."""
    k = draft_tokens_by(costs, round_start_s(costs, i))
    return k if draft_len is None else min(k, draft_len)


def visible_lengths(costs: StreamCosts, rounds: Tensor) -> Tensor:
    """Round indices (any shape, long) -> visible draft lengths, uncapped (the caller caps at its draft)."""
    table = torch.tensor([visible_length(costs, i) for i in range(int(rounds.max()) + 1 if rounds.numel() else 1)],
                         dtype=torch.long, device=rounds.device)
    return table[rounds.clamp_min(0)]


def e2e_speedup(tau: float, n: float, costs: StreamCosts, schedule: str | None, draft_len: float = 0.0) -> float:
    """Projected end-to-end speedup over plain target decoding (docs/design.md §10) of a drafter reaching tau
    on responses of mean length n: `sequential` pays EventGPT's whole response of mean length draft_len
    before the target starts, `concurrent` and None (a drafter that reads no draft) pay nothing up front."""
    plain = costs.target_prefill_s + (n - 1) * costs.target_decode_s
    setup = costs.draft_prefill_s + max(draft_len - 1, 0) * costs.draft_step_s if schedule == SEQUENTIAL else 0.0
    return plain / (costs.target_prefill_s + setup + n / tau * costs.round_period_s)


def round_of_position(run: Tensor, cap: Tensor, length: Tensor, gamma: int) -> Tensor:
    """The round index of every position in the greedy walk at `gamma` read off runs (metrics.rounds_from_runs):
    run, cap [B, n], length [B] -> [B, n] long (positions past a row's length: 0)."""
    from specalign.specdec.metrics import rounds_from_runs

    out = torch.zeros_like(run)
    for b in range(run.shape[0]):
        n = int(length[b])
        for i, r in enumerate(rounds_from_runs(run[b, :n].tolist(), cap[b, :n].tolist(), n, gamma)):
            out[b, r.start: r.start + r.generated] = i
    return out
