"""Lightning modules that train the drafters.

Both share (DrafterModule):
- any optimizer (hydra `instantiate` of the `optimizer` config; no weight decay on 1-D params)
  with a warmup + cosine/linear/constant schedule stepped per optimizer step;
- per-step reseeding: a training step's randomness (dropout, draft dropout) depends only on
  (seed, step, micro-batch, rank), so a resumed run replays an uninterrupted one exactly;
- logs per step and epoch: loss, top-1, top-5 (train/ and val/), EAGLE-3 also acc_k per unroll
  step; and `val/tau`, `val/alpha`: greedy rounds simulated with specdec/metrics.py on up to
  `val_max_rows` val rows, every round drafted by the drafter's own `propose` from the
  accepted prefix (real in-round unrolling, not teacher forcing).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from specalign.adapters.eagle3 import Eagle3Config, Eagle3Drafter, build_vocab_maps
from specalign.adapters.token_adapter import TokenAdapter, TokenAdapterConfig
from specalign.data.store import FeatureStore
from specalign.specdec.metrics import Acceptance, Proposer, simulate_greedy
from torch.optim.lr_scheduler import LambdaLR

from specalign.errors import DataError, SpecalignError, StoreMismatch


def warmup_schedule(optimizer, kind: str = "cosine", warmup_steps: int = 0, total_steps: int = 1000,
                    min_lr_ratio: float = 0.1) -> LambdaLR:
    """Linear warmup, then cosine or linear decay to min_lr_ratio * lr (or constant)."""
    if kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"scheduler kind must be cosine|linear|constant, got {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * t)) if kind == "cosine" else 1 - t
        return min_lr_ratio + (1 - min_lr_ratio) * shape

    return LambdaLR(optimizer, factor)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + micro * 31 + rank) % 2**63


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T] over mask [B, T] (no host sync: no boolean indexing)."""
    return (x * mask).sum() / mask.sum().clamp_min(1)


def topk_metrics(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, to_ids=None) -> dict:
    """logits [B, T, N], labels and mask [B, T] -> top-1 and top-5 accuracy (to_ids maps
    logit columns to label ids)."""
    top = logits.topk(min(5, logits.shape[-1]), -1).indices
    hit = (to_ids(top) if to_ids else top) == labels[..., None]                  # [B, T, 5]
    return {"top1": masked_mean(hit[..., 0].float(), mask), "top5": masked_mean(hit.any(-1).float(), mask)}


def lengths_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    return torch.arange(T, device=lengths.device) < lengths[:, None]   # [B, T]


def check_finite(module: L.LightningModule, split: str, loss: torch.Tensor, batch: dict) -> None:
    """Stop on a non-finite loss, before it reaches the weights, naming the step and the batch's rows: the
    rows whose features are not finite (a damaged store), or else every row (training diverged). One
    device sync per step (the progress bar makes one anyway)."""
    if bool(torch.isfinite(loss)):
        return
    data = module.trainer.datamodule
    rows = data.train_rows if split == "train" else data.val_rows
    keys = [rows[i].key for i in batch["index"].tolist()]
    finite = torch.ones(len(keys), dtype=torch.bool)                                # per row [B]
    for v in batch.values():
        if v.is_floating_point():
            finite &= torch.isfinite(v).flatten(1).all(1).cpu()
    where = (f"training step {module.global_step} (epoch {module.current_epoch})" if split == "train"
             else f"validation after step {module.global_step}")
    bad = [k for k, ok in zip(keys, finite.tolist()) if not ok]
    if bad:
        raise DataError(data.root, f"{where}: the loss is {float(loss)}: non-finite features in "
                        f"{split} rows {', '.join(bad)}", "extract these samples again")
    raise SpecalignError(f"{where}: the loss is {float(loss)} on {split} rows {', '.join(keys)}, whose "
                         "inputs are finite: training diverged (lower adapter.lr or raise adapter.warmup_steps)")


class DrafterModule(L.LightningModule):
    kind: str
    model: torch.nn.Module

    def losses(self, batch: dict, train: bool) -> dict:
        """-> {"loss": scalar, metric name: scalar, ...}"""
        raise NotImplementedError

    def proposers(self, batch: dict) -> Iterator[tuple[list[int], Proposer]]:
        """Per val row: (target tokens, (p, gamma) -> proposal)."""
        raise NotImplementedError

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = instantiate(self.hparams.optimizer, _partial_=True)(groups)
        sched = dict(self.hparams.scheduler)
        total = sched.pop("total_steps", None)
        if not total or total <= 0:
            total = self.trainer.estimated_stepping_batches
        scheduler = instantiate(sched, _partial_=True)(optimizer, total_steps=int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_batch_start(self, batch, batch_idx):
        micro = batch_idx % self.trainer.accumulate_grad_batches
        torch.manual_seed(step_seed(self.hparams.seed, self.global_step, micro, self.global_rank))

    def _log(self, stage: str, metrics: dict, batch_size: int) -> None:
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, on_step=stage == "train", on_epoch=True,
                     prog_bar=name in ("loss", "top1"), batch_size=batch_size, sync_dist=True)

    def training_step(self, batch, batch_idx):
        metrics = self.losses(batch, train=True)
        check_finite(self, "train", metrics["loss"], batch)
        self._log("train", metrics, len(next(iter(batch.values()))))
        return metrics["loss"]

    def on_validation_epoch_start(self):
        self._acceptance = Acceptance(self.hparams.val_gamma)

    def validation_step(self, batch, batch_idx):
        metrics = self.losses(batch, train=False)
        check_finite(self, "val", metrics["loss"], batch)
        self._log("val", metrics, len(next(iter(batch.values()))))
        for target, propose in self.proposers(batch):
            if self._acceptance.samples >= self.hparams.val_max_rows:
                break
            self._acceptance.add_sample(simulate_greedy(target, propose, self.hparams.val_gamma))

    def on_validation_epoch_end(self):
        acc = self._acceptance
        self.log("val/tau", acc.tau, prog_bar=True, sync_dist=True)
        self.log("val/alpha", acc.alpha, sync_dist=True)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["drafter_type"] = self.kind


class TokenAdapterModule(DrafterModule):
    kind = "token_adapter"

    def __init__(self, model: dict, optimizer: dict, scheduler: dict, source: dict | None = None,
                 val_gamma: int = 5, val_max_rows: int = 64, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.model = TokenAdapter(TokenAdapterConfig.from_dict(model))

    def losses(self, batch, train):
        target, c = batch["target"], self.model.config
        keep = None
        if train and c.condition_on_draft:
            keep = torch.rand(target.shape[0], device=target.device) >= c.draft_dropout
        lp = self.model.logits(batch["draft"], batch["draft_len"], target, keep)   # [B, n, V]
        mask = lengths_mask(batch["target_len"], target.shape[1])
        nll = -lp.gather(-1, target[..., None])[..., 0]                            # [B, n]
        return {"loss": masked_mean(nll, mask), **topk_metrics(lp, target, mask)}

    def proposers(self, batch):
        for b in range(batch["target"].shape[0]):
            draft = batch["draft"][b, : batch["draft_len"][b]].tolist()
            target = batch["target"][b, : batch["target_len"][b]].tolist()
            yield target, lambda p, g, d=draft, t=target: self.model.propose(d, t[:p], g)


def token_counts(store: FeatureStore, split: str, vocab_size: int) -> torch.Tensor:
    toks = [t for r in store.select(split) for t in r.target_tokens]
    return torch.bincount(torch.tensor(toks, dtype=torch.long), minlength=vocab_size)[:vocab_size]


class Eagle3Module(DrafterModule):
    """Soft cross-entropy to the target's distribution restricted to the draft vocabulary
    (teacher logits = target.final @ target.lm_head[draft ids].T, recomputed here), summed over
    TTT steps with weight ttt_decay^k, on response rows only (padding masked)."""

    kind = "eagle3"

    def __init__(self, model: dict, optimizer: dict, scheduler: dict, store: str | None = None,
                 train_split: str = "train", source: dict | None = None, val_gamma: int = 5,
                 val_max_rows: int = 64, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.model = Eagle3Drafter(Eagle3Config.from_dict(model))
        c = self.model.config
        self.register_buffer("teacher_head", torch.zeros(c.draft_vocab_size, c.hidden_size), persistent=False)
        if store is not None:
            self.init_from_store(FeatureStore(store), train_split)

    @torch.no_grad()
    def init_from_store(self, store: FeatureStore, split: str) -> None:
        """Draft vocabulary from the split's token frequencies; the target's embeddings (frozen)
        and LM head rows (teacher, and the drafter head's starting point)."""
        m, c = self.model, self.model.config
        heads = store.heads()
        embed, head = heads["target.embed_tokens"], heads["target.lm_head"]
        if embed.shape != (c.vocab_size, c.hidden_size) or head.shape != embed.shape:
            raise StoreMismatch(f"{store.root}: target heads are {tuple(head.shape)}/{tuple(embed.shape)}, "
                                f"the drafter expects {(c.vocab_size, c.hidden_size)}")
        d2t, t2d = build_vocab_maps(token_counts(store, split, c.vocab_size), c.draft_vocab_size)
        m.d2t.copy_(d2t)
        m.t2d.copy_(t2d)
        m.embed_tokens.weight.copy_(embed)
        self.teacher_head.copy_(head[torch.arange(c.draft_vocab_size) + d2t])
        m.lm_head.weight.copy_(self.teacher_head)

    def losses(self, batch, train):
        m, c = self.model, self.model.config
        tokens = batch["tokens"]                                                  # [B, T]
        T = tokens.shape[1]
        valid = lengths_mask(batch["length"], T)
        with torch.no_grad():                                                     # row j predicts r_j
            teacher = (batch["final"].to(self.teacher_head.dtype) @ self.teacher_head.T).float().softmax(-1)
        out = {"loss": 0.0}
        steps = max(1, min(c.ttt_steps, T - 1))
        for k, logits in enumerate(m.ttt(batch["feats"], tokens, steps)):
            mask = valid[:, k + 1:]                                               # chain i -> r_{i+k+1}
            labels, lg = tokens[:, k + 1:], logits[:, : T - k - 1]                # lg [B, T-k-1, N]
            ce = F.cross_entropy(lg.flatten(0, 1).float(), teacher[:, k + 1:].flatten(0, 1), reduction="none")
            loss_k = masked_mean(ce.view_as(labels), mask)
            out["loss"] = out["loss"] + c.ttt_decay ** k * loss_k
            out[f"acc_{k}"] = masked_mean((m.to_target(lg.argmax(-1)) == labels).float(), mask)
            if k == 0:
                out.update(topk_metrics(lg, labels, mask, m.to_target), loss_0=loss_k)
        return out

    def proposers(self, batch):
        for b in range(batch["tokens"].shape[0]):
            n = int(batch["length"][b])
            feats, target = batch["feats"][b, :n], batch["tokens"][b, :n].tolist()
            yield target, lambda p, g, f=feats, t=target: self.model.propose(f, t[:p], g)
