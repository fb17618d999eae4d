"""Exported drafters as drafters of the online engine (the `specdec.online.Drafter` protocol).

TokenAdapterDrafter: `TokenAdapter.propose(draft response, accepted prefix, gamma)`; the engine's
`request` is the draft model's free-running response (EventGPT's greedy tokens).

Eagle3OnlineDrafter: EAGLE-3 on the features of the accepted prefix, row j being the hidden state at
the position that predicts r_j (vlms/alignment.py), as in the feature store:
- target features come from the engine: the prompt's last position from `begin`, then one row per
  token that enters the target cache from `observe` (pass `hidden_layers=drafter.target_layers`);
- draft features (feature_source draft/both) come from EventGPT run teacher-forced on the accepted
  prefix through its own KV cache: `begin` runs its prefill (the engine's `request` is the draft
  prefill), each `propose` feeds the tokens accepted since the last round but the newest one. The
  accepted prefix only grows, so the cache is never rolled back; the cost is one draft forward of
  about tau tokens per round, timed as part of the drafting.
Features are rounded to `feature_dtype`, the feature store's dtype the drafter was trained on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adapters.eagle3 import fuse_features
from specalign.errors import SpecalignError
from specdec.online import DraftContext, forward_tokens, run_prefill


class TokenAdapterDrafter:
    """keep_draft=False drops the draft segment: the trained model without draft conditioning."""

    def __init__(self, model, keep_draft: bool = True):
        self.model, self.keep_draft = model, keep_draft

    def begin(self, context: DraftContext) -> None:
        self.draft = [int(t) for t in context.request] if self.keep_draft else []

    def propose(self, accepted: list[int], gamma: int) -> tuple[list[int], None]:
        return self.model.propose(self.draft, accepted, gamma), None

    def observe(self, accepted_tokens: list[int], hidden: dict[int, Tensor] | None) -> None:
        pass


def feature_layer(name: str) -> tuple[str, int]:
    """'target.h4' -> ('target', 4): the model and its hidden_states index."""
    model, _, layer = name.partition(".")
    if model not in ("target", "draft") or not layer.startswith("h") or not layer[1:].isdigit():
        raise SpecalignError(f"online EAGLE-3 reads captured decoder-layer inputs ('target.hN' / 'draft.hN'), "
                             f"not {name!r}")
    return model, int(layer[1:])


class Eagle3OnlineDrafter:
    def __init__(self, model, draft_model=None, feature_dtype: torch.dtype = torch.bfloat16):
        self.model, self.draft_model, self.feature_dtype = model, draft_model, feature_dtype
        self.names = list(model.config.feature_names)
        self.layers = {n: feature_layer(n) for n in self.names}
        if self.draft_layers and draft_model is None:
            raise SpecalignError(f"this EAGLE-3 drafter reads draft features {self.names}: give the draft model")

    def _layers_of(self, source: str) -> list[int]:
        return [layer for model, layer in self.layers.values() if model == source]

    @property
    def target_layers(self) -> list[int]:
        return self._layers_of("target")

    @property
    def draft_layers(self) -> list[int]:
        return self._layers_of("draft")

    def _keep(self, source: str, hidden: dict[int, Tensor]) -> None:
        for name, (model, layer) in self.layers.items():
            if model == source:
                self.rows[name].append(hidden[layer].to(self.feature_dtype))

    def begin(self, context: DraftContext) -> None:
        self.rows: dict[str, list[Tensor]] = {n: [] for n in self.names}
        self._keep("target", {i: h[-1:] for i, h in (context.hidden or {}).items()})
        if self.draft_layers:
            pre = run_prefill(self.draft_model, context.request, self.draft_layers)
            self.draft_cache, self.fed = pre.cache, 0       # response tokens in the draft cache
            self._keep("draft", {i: h[-1:] for i, h in pre.hidden.items()})

    def _feed_draft(self, accepted: list[int]) -> None:
        """Draft rows up to the one predicting the newest accepted token: feed r[fed : p - 1]."""
        new = accepted[self.fed: len(accepted) - 1]
        if new:
            self._keep("draft", forward_tokens(self.draft_model, self.draft_cache, new, self.draft_layers)[1])
            self.fed += len(new)

    def propose(self, accepted: list[int], gamma: int) -> tuple[list[int], None]:
        if self.draft_layers:
            self._feed_draft(accepted)
        p = len(accepted)
        features = fuse_features(lambda n: torch.cat(self.rows[n])[:p], self.names)     # [p, fc_in]
        return self.model.propose(features, accepted, gamma), None

    def observe(self, accepted_tokens: list[int], hidden: dict[int, Tensor] | None) -> None:
        if hidden:
            self._keep("target", hidden)
