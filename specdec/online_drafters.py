"""Registered drafters as drafters of the online engine (the `specdec.online.Drafter` protocol).

`OnlineDrafter` serves every drafter type (adapters/registry.py): its inputs along the sequence come from
the type's `OnlineInputs` (the TokenAdapter: EventGPT's response, the engine's request; EAGLE-3: target
features from the engine's hidden states and EventGPT's own, see adapters/eagle3.py), and each round is the
model's one `propose` from the accepted prefix with a pick rule:

- greedy (the default): the argmax, no distributions;
- `SampledPick` (given a `Sampling` and a CPU generator): each token drawn from q, the drafter's next-token
  distribution at the sampling temperature (and top-p) along its own drawn tokens, for speculative sampling;
  the engine's acceptance rule min(1, p/q) needs exactly those q, returned as [k, V] (EAGLE-3: zeros outside
  its draft vocabulary). `sampled` gives a copy in sampling mode that shares the weights.

On the static engine, greedy rounds run on static shapes (one CUDA graph per round) where the type offers
a proposer for it (`DrafterType.static_proposer`, specdec/fast_drafters.py); sampling keeps the eager path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from specalign.adapters.registry import OnlineInputs, Pick, greedy
from specalign.specdec.online import DraftContext, Sampling, draw
from specalign.specdec.tree import Tree, TreeSpec, grow
from torch import Tensor, nn


class SampledPick:
    """The sampling pick rule: q = sampling.probs(logits) on the CPU, one draw from it."""

    def __init__(self, sampling: Sampling, generator: torch.Generator | None):
        self.sampling, self.generator = sampling, generator

    def __call__(self, logits: Tensor) -> tuple[int, Tensor]:
        q = self.sampling.probs(logits).cpu()                                            # [V]
        return draw(q, self.generator), q


class OnlineDrafter:
    """A drafter model in the engine; `inputs` makes a fresh per-sequence reader of its inputs; `static`, a
    static-shape proposer of its greedy rounds (or None: `propose` itself)."""

    def __init__(self, model: nn.Module, inputs: Callable[[], OnlineInputs], pick: Pick = greedy, static=None):
        self.model, self.make_inputs, self.pick = model, inputs, pick
        self.static = static if pick is greedy else None
        self.inputs = inputs()

    @property
    def request(self) -> str | None:
        return self.inputs.request

    @property
    def hidden_layers(self) -> list[int]:
        return list(self.inputs.hidden_layers)

    def sampled(self, sampling: Sampling, generator: torch.Generator | None) -> OnlineDrafter:
        return OnlineDrafter(self.model, self.make_inputs, SampledPick(sampling, generator))

    def begin(self, context: DraftContext) -> None:
        self.inputs.begin(context)
        if self.static is not None:
            self.static.begin(self.inputs.context([]))

    def propose(self, accepted: list[int], gamma: int) -> tuple[list[int], Tensor | None]:
        context = self.inputs.context(accepted)
        if self.static is not None:
            return self.static.propose(context, accepted, gamma), None
        return self.model.propose(context, accepted, gamma, self.pick)

    def observe(self, accepted_tokens: list[int], hidden: dict[int, Tensor] | None) -> None:
        self.inputs.observe(accepted_tokens, hidden)

    def propose_tree(self, accepted: list[int], depth: int, spec: TreeSpec) -> Tree:
        """A draft tree of `depth` from the accepted prefix (specdec/tree.py), grown through the model's
        `tree_logprobs` hook; greedy decoding only."""
        context = self.inputs.context(accepted)
        return grow(lambda paths: self.model.tree_logprobs(context, accepted, paths), depth, spec.budget, spec.topk)
