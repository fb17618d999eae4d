"""Acceptance replayed at real scale: a real drafter's cost with a recorded (or drawn) acceptance.

Random weights give a model's real costs but meaningless acceptance. An acceptance trace is what
`specalign evaluate` records in report.json (`rounds_trace`: per drafter and gamma, per request, the number
of draft tokens the target accepted in each round). `ReplayDrafter` wraps a real drafter: every round it
runs the drafter's own proposal (its forwards run, so its cost is real), then proposes instead the target's
own greedy tokens (known from a plain run) for exactly the traced number of positions, then one wrong token,
then the drafter's own tokens up to gamma. The target therefore accepts exactly the traced lengths, its
output is its plain greedy output, and every round verifies gamma + 1 tokens, as real drafting does.

Draft trees (`ReplayTreeDrafter`): every round the drafter grows its real tree (its forwards run), then the
verified tree keeps its node count (the verification width, the cost that matters) but is laid out as a spine
of depth gamma whose first a tokens are the target's greedy tokens (a from the trace), the rest wrong, with
the other nodes as wrong siblings along it: exactly one root path is accepted, for exactly a tokens. (The
grown trees of random weights are flat, a few depths deep, where trained drafters' reach gamma; the
verification's cost does not depend on the tree's shape, only on its width.)

`synthetic_trace(tau)`: rounds with one per-token acceptance probability alpha (a round ends at its first
rejection), alpha set so that the mean accepted length tau (bonus token included) is T at a reference gamma;
other gammas follow from the same alpha. The rounds are drawn by inverting the distribution at a
low-discrepancy sequence, so that any stretch of them (the few dozen rounds of a short benchmark) has close
to the right mean.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from specalign.specdec.online import DraftContext, Drafter
from specalign.specdec.tree import Tree, TreeSpec
from torch import Tensor

from specalign.errors import DataError, SpecalignError

Trace = dict[int, list[list[int]]]     # gamma -> per request, the accepted draft tokens of each round


def rounds_trace(runs_by_gamma: dict[int, Sequence[Sequence]]) -> dict[str, list[list[int]]]:
    """report.json's `rounds_trace` entry of one drafter: {"<gamma>": per request [accepted per round]},
    from `metrics.Round` lists (offline simulation or online runs)."""
    return {str(g): [[r.accepted for r in rounds] for rounds in per_request] for g, per_request in runs_by_gamma.items()}


def load_trace(path: str | Path, drafter: str = "drafter") -> Trace:
    """{gamma: per request [accepted per round]} of one drafter of a `specalign evaluate` report."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(path, f"cannot read the report ({e})", hint="give the report.json of specalign evaluate")
    traces = report.get("rounds_trace") if isinstance(report, dict) else None
    if not traces:
        raise DataError(path, "no per-round accepted lengths (rounds_trace)",
                        hint="rerun `specalign evaluate` with this version to record them, or pass --tau T")
    if drafter not in traces:
        raise DataError(path, f"no rounds_trace for drafter {drafter!r}",
                        hint=f"pass --trace-drafter with one of {sorted(traces)}")
    out = {}
    for g, per_request in traces[drafter].items():
        if not per_request or not all(isinstance(r, list) and all(isinstance(a, int) and 0 <= a <= int(g) for a in r)
                                      for r in per_request):
            raise DataError(path, f"rounds_trace[{drafter!r}][{g!r}] is not lists of accepted lengths 0..{g}",
                            hint="give an unedited report of specalign evaluate")
        out[int(g)] = per_request
    return out


def trace_for(trace: Trace, gamma: int, source: str) -> list[int]:
    """All rounds of one gamma, requests concatenated."""
    if gamma not in trace:
        raise DataError(source, f"no rounds_trace at gamma={gamma} (it has {sorted(trace)})",
                        hint="pass --gammas with those, or rerun specalign evaluate with gamma=[3,5,7]")
    return [a for per_request in trace[gamma] for a in per_request]


def alpha_for_tau(tau: float, gamma: int) -> float:
    """Per-token acceptance alpha giving mean accepted length tau = 1 + alpha + ... + alpha^gamma."""
    if not 1.0 <= tau <= gamma + 1:
        raise SpecalignError(f"--tau must be between 1 and gamma + 1 = {gamma + 1} at gamma={gamma}, got {tau}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(mid ** k for k in range(gamma + 1)) < tau else (lo, mid)
    return (lo + hi) / 2


def van_der_corput(i: int) -> float:
    """The i-th point (i >= 1) of the base-2 van der Corput sequence in (0, 1)."""
    x, scale = 0.0, 0.5
    while i:
        x, i, scale = x + scale * (i & 1), i >> 1, scale / 2
    return x


def synthetic_trace(tau: float, gammas: Sequence[int], rounds: int = 4096, reference_gamma: int = 5) -> Trace:
    """Rounds with the alpha giving tau at `reference_gamma`: {gamma: [[a, a, ...]]} (one long request).
    P(a >= k) = alpha^k: a is the number of k in 1..gamma with u < alpha^k."""
    alpha = alpha_for_tau(tau, reference_gamma)
    u = [van_der_corput(i) for i in range(1, rounds + 1)]
    return {gamma: [[sum(x < alpha ** k for k in range(1, gamma + 1)) for x in u]] for gamma in gammas}


class ReplayDrafter:
    """Replays a trace of accepted lengths through a real drafter (see the module docstring). `lengths` is
    shared by the requests of one run (an endless iterator, e.g. `itertools.cycle(trace_for(...))`);
    `planned` records the accepted length each round was given."""

    def __init__(self, drafter: Drafter, target_tokens: Sequence[int], lengths: Iterator[int], vocab: int):
        self.drafter, self.target, self.lengths, self.vocab = drafter, [int(t) for t in target_tokens], lengths, vocab
        self.planned: list[int] = []

    def begin(self, context: DraftContext) -> None:
        self.drafter.begin(context)

    def propose(self, accepted: list[int], gamma: int) -> tuple[list[int], Tensor | None]:
        own, _ = self.drafter.propose(accepted, gamma)           # the real drafter's forwards, its real cost
        p = len(accepted)
        if self.target[:p] != list(accepted):
            raise SpecalignError("the replayed run left the target's plain greedy output: the target's verification "
                                 "disagrees with its one-token decoding (a numerical near-tie)")
        a = min(next(self.lengths), gamma, len(self.target) - p)
        out = self.target[p: p + a]
        if a < gamma and p + a < len(self.target):
            out.append((self.target[p + a] + 1) % self.vocab)    # any other token: the first rejection
            out += [int(t) for t in own[a + 1: gamma]]           # past it nothing is kept
            out += [out[-1]] * (gamma - len(out))
        self.planned.append(a)
        return out, None

    def observe(self, accepted_tokens: list[int], hidden: dict[int, Tensor] | None) -> None:
        self.drafter.observe(accepted_tokens, hidden)


def replay_lengths(trace: Trace, gamma: int, source: str) -> Iterator[int]:
    rounds = trace_for(trace, gamma, source)
    return itertools.cycle(rounds)


def replay_tree(nodes: int, depth: int, target: Sequence[int], a: int, vocab: int) -> Tree:
    """A tree of `nodes` nodes after the accepted prefix whose only accepted root path is `target[:a]`:
    a spine of min(depth, nodes) nodes holding target[:a] then wrong tokens, the other nodes wrong children of
    the root and the spine nodes in turn (shallow first). `target`: the target's greedy tokens from here on;
    a spine deeper than len(target) would meet tokens nobody knows, so it stops there."""
    spine_len = min(depth, nodes, len(target)) if a < len(target) else a
    tree, spine, wrong = Tree(), [], {}        # wrong: parent -> wrong children so far (distinct tokens)

    def wrong_token(parent: int, d: int) -> int:
        wrong[parent] = wrong.get(parent, 0) + 1
        return (target[d - 1] + wrong[parent]) % vocab if d <= len(target) else 0

    for d in range(1, spine_len + 1):
        parent = spine[-1] if spine else -1
        spine.append(tree.add(target[d - 1] if d <= a else wrong_token(parent, d), parent, 0.0))
    parents = [-1, *spine[: max(min(spine_len, len(target)) - 1, 0)]]   # depths 1 .. whose target token is known
    for i in range(nodes - len(spine)):
        parent = parents[i % len(parents)]
        tree.add(wrong_token(parent, tree.depths[parent] + 1 if parent >= 0 else 1), parent, 0.0)
    return tree


class ReplayTreeDrafter:
    """`ReplayDrafter` for draft trees (module docstring): the wrapped drafter's `propose_tree` runs every round,
    then `replay_tree` of its node count (the budget where the drafter proposes nothing, as EAGLE-3 at p = 0)."""

    def __init__(self, drafter, target_tokens: Sequence[int], lengths: Iterator[int], vocab: int):
        self.drafter, self.target, self.lengths, self.vocab = drafter, [int(t) for t in target_tokens], lengths, vocab
        self.planned: list[int] = []
        self.grown: list[int] = []                 # the drafter's own node count per round

    def begin(self, context: DraftContext) -> None:
        self.drafter.begin(context)

    def propose_tree(self, accepted: list[int], depth: int, spec: TreeSpec) -> Tree:
        own = self.drafter.propose_tree(accepted, depth, spec)    # the real drafter's forwards, its real cost
        p = len(accepted)
        if self.target[:p] != list(accepted):
            raise SpecalignError("the replayed run left the target's plain greedy output: the target's tree "
                                 "verification disagrees with its one-token decoding (a numerical near-tie)")
        nodes = len(own) or spec.budget
        a = min(next(self.lengths), depth, nodes, len(self.target) - p)
        self.planned.append(a)
        self.grown.append(len(own))
        return replay_tree(nodes, depth, self.target[p:], a, self.vocab)

    def observe(self, accepted_tokens: list[int], hidden: dict[int, Tensor] | None) -> None:
        self.drafter.observe(accepted_tokens, hidden)
