"""A toy drafter type defined outside the package: a bigram table (the next token from the last accepted
one). Importing this module registers it; tests/conf/adapter/bigram.yaml is its config. The package has
no code for it, so a test that trains, exports and evaluates it shows that a new type needs nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from specalign.adapters.registry import ChainRuns, DrafterType, Pick, greedy, register, stacked
from specalign.specdec.metrics import match_runs
from specalign.train.modules import DrafterModule, lengths_mask, masked_mean, topk_metrics
from torch import Tensor, nn

CONF = Path(__file__).parent / "conf"     # hydra.searchpath=[file://CONF] adds adapter=bigram


@dataclass
class BigramConfig:
    vocab_size: int = 32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BigramConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class Bigram(nn.Module):
    """Logits of the next token given the previous one; row V stands before the first token."""

    kind = "bigram"

    def __init__(self, config: BigramConfig):
        super().__init__()
        self.config = config
        self.table = nn.Embedding(config.vocab_size + 1, config.vocab_size)
        nn.init.zeros_(self.table.weight)                      # uniform to start: a few steps train it

    def next_logprobs(self, batch: dict) -> Tensor:
        target = batch["target"]                                                    # [B, n]
        start = target.new_full((target.shape[0], 1), self.config.vocab_size)
        return self.table(torch.cat([start, target[:, :-1]], 1)).log_softmax(-1)    # [B, n, V]

    @torch.no_grad()
    def chain_runs(self, batch: dict, depth: int) -> ChainRuns:
        target, length = batch["target"], batch["target_len"]
        hit = (self.next_logprobs(batch).argmax(-1) == target) & lengths_mask(length, target.shape[1])
        return ChainRuns(match_runs(hit), torch.full_like(target, depth), length)

    @torch.no_grad()
    def propose(self, context, prefix: Sequence[int], gamma: int, pick: Pick = greedy):
        prev, out, qs = int(prefix[-1]) if prefix else self.config.vocab_size, [], []
        for _ in range(gamma):
            prev, q = pick(self.table.weight[prev].log_softmax(-1))
            out.append(prev)
            qs.append(q)
        return out, stacked(qs)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class BigramModule(DrafterModule):
    kind = "bigram"

    def losses(self, batch, train):
        lp, target = self.model.next_logprobs(batch), batch["target"]
        mask = lengths_mask(batch["target_len"], target.shape[1])
        nll = F.nll_loss(lp.transpose(1, 2), target, reduction="none")
        return {"loss": masked_mean(nll, mask), **topk_metrics(lp, target, mask)}


@register
class BigramType(DrafterType):
    kind = "bigram"
    model_class, config_class, module_class = Bigram, BigramConfig, BigramModule
