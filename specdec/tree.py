"""Draft trees (EAGLE-2 dynamic trees): one home for the tree, its expansion, its verification inputs and its
greedy acceptance; offline (specdec/offline.py) and online (specdec/online.py) both read them from here.

A round at accepted prefix r[:p] drafts a tree instead of a chain. Node i holds a token, its parent (-1: the
root, i.e. the accepted prefix), its depth (1 = the token after the prefix) and its score, the cumulative draft
log-probability of its root path. Expansion, depth by depth up to `depth` (= gamma):

    depth 1: the top-k tokens after the prefix
    depth d: the top-k children of each of the k best nodes of depth d - 1 (by score)
    then:    the `budget` best nodes of all (a child never scores above its parent, so they form a tree)

A drafter type supplies one batched hook, `tree_logprobs(context, prefix, paths) -> [len(paths), V]`: the
next-token log-probabilities after prefix + each path (adapters/registry.py); -inf rows propose nothing.

Verification is one target forward over [pending bonus token] + the nodes, node i at position
L + len(pending) + depth_i - 1 (L: cached tokens), attending the cache, the pending token and its own
ancestors (`attention_mask`). Greedy acceptance is the longest root path whose tokens equal the target's
greedy tokens: from the root, step to the child holding the target's token after the current node while
there is one; the target's token after the last accepted node is the bonus.

`tree.budget = 0` means chains (today's rounds, no tree code at all); a tree needs a node per depth
(budget >= gamma), top-k >= 1 and a drafter with a distribution. Trees are greedy: with a temperature,
speculative sampling runs the chains only (`tree_notes` says so in the report).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from specalign.specdec.report import TREE_SUFFIX
from torch import Tensor

from specalign.errors import SpecalignError

# paths (token lists of equal length) -> log-probabilities [len(paths), V] of the token after prefix + path
TreeLogprobs = Callable[[list[list[int]]], Tensor]


@dataclass(frozen=True)
class TreeSpec:
    budget: int = 0                 # nodes per round; 0: a chain
    topk: int = 4                   # children per expanded node, and nodes expanded per depth
    gammas: tuple[int, ...] = ()    # the depths trees are scored at (empty: every gamma of the report)

    @property
    def on(self) -> bool:
        return self.budget > 0

    def depths(self, gammas: Sequence[int]) -> list[int]:
        """The report's gammas that get tree rows."""
        return [g for g in gammas if not self.gammas or g in self.gammas] if self.on else []


def tree_spec(cfg, gammas: Sequence[int]) -> TreeSpec:
    """The `tree` config ({budget, topk, gammas}; None: chains) checked against the depths it drafts."""
    if not cfg:
        return TreeSpec()
    depths = cfg.get("gammas")
    depths = () if depths is None else tuple(int(g) for g in (depths if hasattr(depths, "__iter__") else [depths]))
    spec = TreeSpec(int(cfg.get("budget") or 0), int(cfg.get("topk") if cfg.get("topk") is not None else 4), depths)
    if spec.budget < 0:
        raise SpecalignError(f"tree.budget must be 0 (chains) or a node count, got {spec.budget}")
    if not spec.on:
        return spec
    if spec.topk < 1:
        raise SpecalignError(f"tree.topk={spec.topk}: a tree expands at least one child per node; set tree.topk >= 1")
    if not spec.depths(gammas):
        raise SpecalignError(f"tree.gammas={list(spec.gammas)} holds none of gamma={list(gammas)}: give depths "
                             "among the gammas, or null for all of them")
    if spec.budget < max(spec.depths(gammas)):
        raise SpecalignError(f"tree.budget={spec.budget} is below the depth gamma={max(spec.depths(gammas))}: a tree "
                             "of depth gamma needs at least gamma nodes; raise tree.budget or set it to 0 for chains")
    return spec


def tree_notes(spec: TreeSpec, temperature: float | None = None) -> list[str]:
    """What a report says about its tree rows; trees are greedy only (speculative sampling stays chain-only)."""
    if not spec.on:
        return []
    notes = [(f"'<drafter>{TREE_SUFFIX}': the drafter's EAGLE-2 dynamic tree (tree.budget={spec.budget} nodes, "
              f"tree.topk={spec.topk}, depth γ), verified in one target forward; greedy acceptance of the longest "
              "root path.")]
    if temperature:
        notes.append(f"tree.budget={spec.budget} with temperature={temperature}: speculative sampling is chain-only, "
                     "so the tree rows are greedy and only the chains sample.")
    return notes


def check_tree_drafter(model, name: str, spec: TreeSpec) -> None:
    """A tree needs the drafter's distribution: raw_draft and token lists have none."""
    if spec.on and (model is None or not hasattr(model, "tree_logprobs")):
        raise SpecalignError(f"tree.budget={spec.budget}: '{name}' has no next-token distribution to grow a tree "
                             "from (raw_draft and token lists propose fixed tokens); give a trained drafter= or set "
                             "tree.budget=0")
    if spec.on and getattr(getattr(model, "config", None), "draft_schedule", "full") == "streaming":
        raise SpecalignError(f"tree.budget={spec.budget}: '{name}' reads EventGPT's answer as it streams in "
                             "(adapter.draft_schedule=streaming) and trees are scored on a fixed context; evaluate it "
                             "with tree.budget=0")


@dataclass
class Tree:
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)    # -1: the root (the accepted prefix)
    depths: list[int] = field(default_factory=list)     # 1: the token right after the prefix
    scores: list[float] = field(default_factory=list)   # cumulative draft log-probability of the root path

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        return max(self.depths, default=0)

    def add(self, token: int, parent: int, score: float) -> int:
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.depths.append(1 if parent < 0 else self.depths[parent] + 1)
        self.scores.append(float(score))
        return len(self.tokens) - 1

    def path(self, i: int) -> list[int]:
        """Node ids from the root's child down to node i ([] for the root, -1)."""
        out = []
        while i >= 0:
            out.append(i)
            i = self.parents[i]
        return out[::-1]

    def path_tokens(self, i: int) -> list[int]:
        return [self.tokens[j] for j in self.path(i)]

    def child(self, parent: int, token: int) -> int | None:
        for i, (p, t) in enumerate(zip(self.parents, self.tokens)):
            if p == parent and t == token:
                return i
        return None

    def keep(self, budget: int) -> Tree:
        """The `budget` best nodes (by score; ties: the earlier node) whose parents are kept, in creation order
        (parents before children)."""
        order = sorted(range(len(self)), key=lambda i: (-self.scores[i], i))
        kept: set[int] = set()
        for i in order:
            if len(kept) == budget:
                break
            if self.parents[i] < 0 or self.parents[i] in kept:
                kept.add(i)
        out, new_id = Tree(), {}
        for i in sorted(kept):
            new_id[i] = out.add(self.tokens[i], new_id.get(self.parents[i], -1), self.scores[i])
        return out

    # ---- verification inputs
    def ancestors(self) -> Tensor:
        """[N, N] bool: node i may attend node j (j is i or an ancestor of i)."""
        n = len(self)
        out = torch.eye(n, dtype=torch.bool)
        for i in range(n):
            if self.parents[i] >= 0:
                out[i] |= out[self.parents[i]]      # parents come first: their rows are complete
        return out

    def accepted(self, next_token: Callable[[int], int | None]) -> list[int]:
        """The longest accepted root path (node ids): next_token(i) is the target's greedy token after node i
        (-1: after the prefix), None where there is none (the response ended)."""
        path, node = [], -1
        while (tok := next_token(node)) is not None and (child := self.child(node, tok)) is not None:
            path.append(child)
            node = child
        return path


def grow(logprobs: TreeLogprobs, depth: int, budget: int, topk: int) -> Tree:
    """EAGLE-2 expansion (module docstring): `depth` batched calls of the drafter's hook, then the best
    `budget` nodes."""
    tree, frontier = Tree(), [-1]
    for _ in range(depth):
        lp = logprobs([tree.path_tokens(i) for i in frontier]).float()              # [F, V]
        top = lp.topk(min(topk, lp.shape[-1]), -1)
        new = []
        for parent, values, ids in zip(frontier, top.values.tolist(), top.indices.tolist()):
            base = tree.scores[parent] if parent >= 0 else 0.0
            new += [tree.add(t, parent, base + v) for v, t in zip(values, ids) if v != float("-inf")]
        frontier = sorted(new, key=lambda i: (-tree.scores[i], i))[:topk]
        if not frontier:
            break
    return tree.keep(budget)


def local_inputs(tree: Tree, pending: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The forward over [pending] + the nodes, relative to the cached prefix: ids [M], position offsets [M]
    (pending token i at i, node i at len(pending) + depth_i - 1) and [M, M] bool, what each row sees among these
    rows (the pending tokens causally, every node the pending tokens and its own ancestors); M = len(pending) + N."""
    p = len(pending)
    ids = torch.tensor([*pending, *tree.tokens], dtype=torch.long)
    depth = torch.tensor(tree.depths, dtype=torch.long).reshape(-1)
    offsets = torch.cat([torch.arange(p), p + depth - 1])
    local = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
    if len(tree):
        local[p:, p:] = tree.ancestors()
    return ids, offsets, local


def verify_inputs(tree: Tree, pending: Sequence[int], cached: int, dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """The target forward over [pending] + nodes after `cached` tokens (`local_inputs`, the cache visible to every
    row): ids [1, M], position ids [1, M], additive attention mask [1, 1, M, cached + M] (0: attend, dtype min: not)."""
    ids, offsets, local = local_inputs(tree, pending)
    allow = torch.cat([torch.ones(len(ids), cached, dtype=torch.bool), local], 1)
    mask = torch.zeros(allow.shape, dtype=dtype).masked_fill(~allow, torch.finfo(dtype).min)
    return ids[None].to(device), (offsets + cached)[None].to(device), mask[None, None].to(device)


def round_counts(tree: Tree, target: Sequence[int], start: int) -> tuple[int, int]:
    """A tree round at accepted length `start` against the target's greedy response `target`:
    (proposed: the tree's depth inside the response, accepted: its longest accepted root path)."""
    n = len(target)
    accepted = tree.accepted(lambda i: target[start + (tree.depths[i] if i >= 0 else 0)]
                             if start + (tree.depths[i] if i >= 0 else 0) < n else None)
    proposed = min(tree.depth, n - start)
    return proposed, min(len(accepted), proposed)
