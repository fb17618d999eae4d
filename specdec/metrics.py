"""The acceptance metrics: the one definition used by training, evaluation and reports.

A greedy speculative round (docs/design.md, "Acceptance metrics"): at accepted prefix length p
the drafter proposes gamma tokens; the target accepts the longest prefix that matches its
own greedy tokens r[p:], a tokens (0 <= a <= gamma), and adds one token of its own.

Only tokens inside the response count: a round starting at p can propose at most
n - p useful tokens, and generates min(a + 1, n - p).

    tau     = generated tokens / rounds        (mean accepted length, bonus included)
    alpha   = accepted draft tokens / proposed draft tokens
    alpha_k = accepted at position k / rounds that reached position k

A round "reaches" position k when positions 0..k-1 were accepted and position k is inside
the response.

`simulate_greedy` is the definition: it asks the drafter for each round's proposal. For greedy chains
the rounds can also be read off precomputed runs (`rounds_from_runs`): run[p], how many of the tokens
the drafter proposes from the prefix r[:p] equal r[p:], and cap[p], how many it proposes there at most.
Both walks give the same rounds (tests/test_metrics.py); the runs of every position come from a few
batched forwards of the drafter (adapters/registry.py, `chain_runs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Proposer = Callable[[int, int], Sequence[int]]  # (accepted prefix length p, gamma) -> tokens


@dataclass
class Round:
    start: int          # accepted prefix length at the start of the round
    proposed: int       # draft tokens proposed inside the response (<= gamma)
    accepted: int       # a
    generated: int      # tokens this round adds to the output (accepted + bonus, capped)


@dataclass
class Acceptance:
    """Accumulates rounds over many samples; `summary()` gives tau, alpha and alpha_k."""

    gamma: int
    rounds: int = 0
    tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    samples: int = 0
    reached_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.reached_at:
            self.reached_at = [0] * self.gamma
            self.accepted_at = [0] * self.gamma

    def add_round(self, r: Round) -> None:
        self.rounds += 1
        self.tokens += r.generated
        self.proposed += r.proposed
        self.accepted += r.accepted
        for k in range(min(r.accepted + 1, r.proposed)):
            self.reached_at[k] += 1
            if k < r.accepted:
                self.accepted_at[k] += 1

    def add_sample(self, rounds: Sequence[Round]) -> None:
        self.samples += 1
        for r in rounds:
            self.add_round(r)

    def merge(self, other: Acceptance) -> Acceptance:
        assert other.gamma == self.gamma
        out = Acceptance(self.gamma)
        for name in ("rounds", "tokens", "proposed", "accepted", "samples"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.reached_at = [a + b for a, b in zip(self.reached_at, other.reached_at)]
        out.accepted_at = [a + b for a, b in zip(self.accepted_at, other.accepted_at)]
        return out

    @property
    def tau(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0

    @property
    def alpha(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def alpha_at(self) -> list[float | None]:
        return [a / r if r else None for a, r in zip(self.accepted_at, self.reached_at)]

    def summary(self) -> dict:
        return {"tau": self.tau, "alpha": self.alpha, "alpha_at": self.alpha_at, "rounds": self.rounds,
                "tokens": self.tokens, "proposed": self.proposed, "accepted": self.accepted,
                "samples": self.samples, "gamma": self.gamma}


def accept_length(proposal: Sequence[int], target: Sequence[int], start: int) -> int:
    """Longest prefix of `proposal` equal to target[start:]."""
    a = 0
    for tok in proposal:
        if start + a >= len(target) or int(tok) != int(target[start + a]):
            break
        a += 1
    return a


def make_round(proposal: Sequence[int], target: Sequence[int], start: int, gamma: int) -> Round:
    remaining = len(target) - start
    proposal = list(proposal)[: min(gamma, remaining)]
    return _round(start, len(proposal), accept_length(proposal, target, start), remaining)


def _round(start: int, proposed: int, accepted: int, remaining: int) -> Round:
    """A round that proposed `proposed` tokens inside the response and had `accepted` of them accepted;
    the target adds its own token unless the response has ended."""
    return Round(start=start, proposed=proposed, accepted=accepted, generated=min(accepted + 1, remaining))


def simulate_greedy(target: Sequence[int], propose: Proposer, gamma: int) -> list[Round]:
    """Exact greedy speculative decoding over a known target greedy response."""
    rounds, p, n = [], 0, len(target)
    while p < n:
        r = make_round(propose(p, gamma), target, p, gamma)
        rounds.append(r)
        p += r.generated
    return rounds


def rounds_from_runs(run: Sequence[int], cap: Sequence[int], n: int, gamma: int) -> list[Round]:
    """The rounds of `simulate_greedy` over a response of n tokens, read off the drafter's runs:
    run[p] (counted up to gamma at least) and cap[p] as in the module docstring; positions beyond the
    lists propose nothing."""
    rounds, p = [], 0
    while p < n:
        proposed = min(gamma, cap[p] if p < len(cap) else 0, n - p)
        accepted = min(run[p] if p < len(run) else 0, proposed)
        rounds.append(_round(p, proposed, accepted, n - p))
        p += rounds[-1].generated
    return rounds


def token_runs(tokens: Sequence[int], target: Sequence[int]) -> tuple[list[int], list[int]]:
    """The runs of a drafter proposing tokens[p:p + gamma] at every p (`raw_draft_proposer`: a fixed
    response, or greedy predictions teacher-forced on the target's prefix): run[p] counts the matches
    tokens[j] == target[j] from j = p on, cap[p] the tokens left."""
    n, m = len(target), len(tokens)
    run = [0] * (n + 1)
    for p in range(min(n, m) - 1, -1, -1):
        run[p] = run[p + 1] + 1 if int(tokens[p]) == int(target[p]) else 0
    return run[:n], [max(0, m - p) for p in range(n)]


def match_runs(hit: torch.Tensor) -> torch.Tensor:
    """hit [B, T] bool -> run [B, T] long: how many consecutive positions from p on are hits."""
    T = hit.shape[-1]
    pos = torch.arange(T, device=hit.device)
    miss = torch.where(hit, T, pos)                                   # a miss's own position, T at a hit
    next_miss = miss.flip(-1).cummin(-1).values.flip(-1)              # the first miss at or after p
    return next_miss - pos


def raw_draft_proposer(draft: Sequence[int]) -> Proposer:
    """The draft model's own free-running tokens, proposed position by position."""
    draft = list(draft)
    return lambda p, gamma: draft[p: p + gamma]


def first_run_matches(proposal: Sequence[int], target: Sequence[int]) -> int:
    """Matches running from the first token (the older, stricter 'consecutive acceptance')."""
    return accept_length(proposal, target, 0)


def expected_accept(p_target, q_draft):
    """Expected acceptance of speculative sampling at one position: sum_x min(p(x), q(x)).

    Works on torch tensors [..., V] (probabilities, last dim the vocabulary)."""
    return p_target.minimum(q_draft).sum(-1)


def greedy_acceptance(targets: Sequence[Sequence[int]], proposers: Sequence[Proposer], gamma: int) -> Acceptance:
    acc = Acceptance(gamma)
    for t, prop in zip(targets, proposers):
        acc.add_sample(simulate_greedy(t, prop, gamma))
    return acc


def round_at(start: int, proposed: int, accepted: int, n: int) -> Round:
    """The round at accepted length `start` of a response of n tokens that proposed `proposed` tokens inside it
    and had `accepted` of them accepted (a draft tree: its depth and its longest accepted root path)."""
    return _round(start, proposed, accepted, n - start)


def simulate_rounds(n: int, counts_at: Callable[[int], tuple[int, int]]) -> list[Round]:
    """The rounds over a response of n tokens when the round starting at p proposes and accepts
    counts_at(p) = (proposed, accepted) tokens: `simulate_greedy` for proposals other than a chain (draft trees,
    specdec/tree.py: `round_counts`)."""
    rounds, p = [], 0
    while p < n:
        rounds.append(round_at(p, *counts_at(p), n))
        p += rounds[-1].generated
    return rounds
