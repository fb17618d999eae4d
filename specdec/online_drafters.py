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

Both are greedy by default. Given a `Sampling` (and a CPU generator), they SAMPLE their proposals for
speculative sampling and return q [k, V], the distributions each proposal was drawn from (the engine's
acceptance rule min(1, p/q) needs exactly those): the TokenAdapter's next-token distribution at the
sampling temperature (and top-p) along its own sampled tokens; EAGLE-3's over its reduced draft vocabulary,
scattered into the target vocabulary (zeros outside the draft vocabulary). `with_sampling` gives a copy
of a drafter in sampling mode that shares its weights.
"""

from __future__ import annotations

import torch
from specalign.adapters.eagle3 import fuse_features
from specalign.specdec.online import DraftContext, Sampling, draw, forward_tokens, run_prefill
from torch import Tensor

from specalign.errors import SpecalignError


@torch.no_grad()
def sample_token_adapter(model, draft_tokens: list[int], prefix: list[int], gamma: int, sampling: Sampling,
                         generator: torch.Generator | None) -> tuple[list[int], Tensor | None]:
    """`TokenAdapter.propose` with each token drawn from q = sampling.probs(its log-probs) instead of the
    argmax, feeding the drawn token back. -> (tokens, q [k, V] float32 on the CPU; None when k = 0)."""
    c = model.config
    gamma = min(gamma, c.max_len - len(prefix))
    if gamma <= 0:
        return [], None
    dev = model.head.weight.device
    draft = list(draft_tokens)[: c.max_len]
    memory, has = model._memory(torch.tensor([draft], dtype=torch.long, device=dev).view(1, -1),
                                torch.tensor([len(draft)], device=dev), None)
    ids = torch.tensor([[c.sep_id, *prefix]], dtype=torch.long, device=dev)
    out, qs, past, start = [], [], None, 0
    for _ in range(gamma):
        h, past = model._decode(ids, start, memory, has, past)
        q = sampling.probs(model._logprobs(h[:, -1:], memory, has)[0, -1]).cpu()       # [V]
        qs.append(q)
        out.append(draw(q, generator))
        start += ids.shape[1]
        ids = torch.tensor([out[-1:]], dtype=torch.long, device=dev)
    return out, torch.stack(qs)


class TokenAdapterDrafter:
    """keep_draft=False drops the draft segment: the trained model without draft conditioning.
    Greedy, or sampled proposals with their q when `sampling` is given."""

    def __init__(self, model, keep_draft: bool = True, sampling: Sampling | None = None,
                 generator: torch.Generator | None = None):
        self.model, self.keep_draft = model, keep_draft
        self.sampling, self.generator = sampling, generator

    def with_sampling(self, sampling: Sampling, generator: torch.Generator | None) -> TokenAdapterDrafter:
        return TokenAdapterDrafter(self.model, self.keep_draft, sampling, generator)

    def begin(self, context: DraftContext) -> None:
        self.draft = [int(t) for t in context.request] if self.keep_draft else []

    def propose(self, accepted: list[int], gamma: int) -> tuple[list[int], Tensor | None]:
        if self.sampling is None:
            return self.model.propose(self.draft, accepted, gamma), None
        return sample_token_adapter(self.model, self.draft, list(accepted), gamma, self.sampling, self.generator)

    def observe(self, accepted_tokens: list[int], hidden: dict[int, Tensor] | None) -> None:
        pass


def feature_layer(name: str) -> tuple[str, int]:
    """'target.h4' -> ('target', 4): the model and its hidden_states index."""
    model, _, layer = name.partition(".")
    if model not in ("target", "draft") or not layer.startswith("h") or not layer[1:].isdigit():
        raise SpecalignError(f"online EAGLE-3 reads captured decoder-layer inputs ('target.hN' / 'draft.hN'), "
                             f"not {name!r}")
    return model, int(layer[1:])


@torch.no_grad()
def sample_eagle3(model, features: Tensor, tokens: list[int], gamma: int, sampling: Sampling,
                  generator: torch.Generator | None) -> tuple[list[int], Tensor | None]:
    """`Eagle3Drafter.propose` with each token drawn from q = sampling.probs of its draft-vocabulary logits
    placed at their target ids (-inf elsewhere) instead of the argmax, unrolling on the drawn tokens.
    -> (target ids, q [k, V_target] float32 on the CPU, zero outside the draft vocabulary; None when k = 0:
    nothing is proposed before the first accepted token)."""
    p = len(tokens)
    if p == 0 or gamma <= 0:
        return [], None
    dev = model.fc.weight.device
    feats = features[:p].to(dev, model.fc.weight.dtype)[None]                       # [1, p, fc_in]
    ids = torch.as_tensor(list(tokens), dtype=torch.long, device=dev)[None]
    causal = torch.ones(p, p, dtype=torch.bool, device=dev).tril()
    past, out, qs = [], [], []
    hidden, logits = model.step(ids, model.fc(feats), torch.arange(p, device=dev)[None], past, causal)
    hidden, logits = hidden[:, -1:], logits[:, -1:]                                   # chain p-1
    to_target = model.to_target(torch.arange(model.config.draft_vocab_size, device=dev)).cpu()   # [N]
    for k in range(1, gamma + 1):
        full = torch.full((model.config.vocab_size,), float("-inf"))                  # draft logits, target ids
        full[to_target] = logits[0, -1].float().cpu()
        q = sampling.probs(full)                                                       # [V_target]
        qs.append(q)
        tok = draw(q, generator)
        out.append(tok)
        if k < gamma:
            hidden, logits = model.step(torch.tensor([[tok]], device=dev), hidden,
                                        torch.tensor([[p - 1 + k]], device=dev), past, None)
    return out, torch.stack(qs)


class Eagle3OnlineDrafter:
    def __init__(self, model, draft_model=None, feature_dtype: torch.dtype = torch.bfloat16,
                 sampling: Sampling | None = None, generator: torch.Generator | None = None):
        self.model, self.draft_model, self.feature_dtype = model, draft_model, feature_dtype
        self.sampling, self.generator = sampling, generator
        self.names = list(model.config.feature_names)
        self.layers = {n: feature_layer(n) for n in self.names}
        if self.draft_layers and draft_model is None:
            raise SpecalignError(f"this EAGLE-3 drafter reads draft features {self.names}: give the draft model")

    def with_sampling(self, sampling: Sampling, generator: torch.Generator | None) -> Eagle3OnlineDrafter:
        return Eagle3OnlineDrafter(self.model, self.draft_model, self.feature_dtype, sampling, generator)

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

    def features(self, accepted: list[int]) -> Tensor:
        """The fused feature rows of the accepted prefix: [p, fc_in]."""
        if self.draft_layers:
            self._feed_draft(accepted)
        return fuse_features(lambda n: torch.cat(self.rows[n])[: len(accepted)], self.names)

    def propose(self, accepted: list[int], gamma: int) -> tuple[list[int], Tensor | None]:
        features = self.features(accepted)
        if self.sampling is None:
            return self.model.propose(features, accepted, gamma), None
        return sample_eagle3(self.model, features, list(accepted), gamma, self.sampling, self.generator)

    def observe(self, accepted_tokens: list[int], hidden: dict[int, Tensor] | None) -> None:
        if hidden:
            self._keep("target", hidden)
