"""What every drafter's Lightning module shares (DrafterModule); each drafter type subclasses it with
its own `losses` in its module (adapters/<kind>.py):
- any optimizer (hydra `instantiate` of the `optimizer` config; no weight decay on 1-D params)
  with a warmup + cosine/linear/constant schedule stepped per optimizer step;
- per-step reseeding: a training step's randomness (dropout, draft dropout) depends only on
  (seed, step, micro-batch, rank), so a resumed run replays an uninterrupted one exactly;
- logs per step and epoch: loss, top-1, top-5 (train/ and val/), EAGLE-3 also acc_k per unroll
  step; and `val/tau`, `val/alpha`: greedy rounds on up to `val_max_rows` val rows, read off the
  drafter's chains at every position of each val batch (`chain_runs`: its real in-round proposals, in a
  few batched forwards) and walked with specdec/metrics.py.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from hydra.utils import instantiate
from specalign.adapters.registry import drafter_type
from specalign.data.store import FeatureStore
from specalign.specdec.metrics import Acceptance, rounds_from_runs
from torch.optim.lr_scheduler import LambdaLR

from specalign.errors import DataError, SpecalignError
from specalign.runtime import derived_seed


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


def batch_rows(batch: dict, k: int) -> dict:
    """The first k rows of a batch (every value has the batch dimension first)."""
    return {name: value[:k] for name, value in batch.items()}


class DrafterModule(L.LightningModule):
    """Trains the drafter `model`, built by its registered type from the `model` config dict."""

    kind: str

    def __init__(self, model: dict, optimizer: dict, scheduler: dict, source: dict | None = None,
                 val_gamma: int = 5, val_max_rows: int = 64, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.model = drafter_type(self.kind).build(model)

    def init_from_store(self, store: FeatureStore, split: str) -> None:
        """What the model takes from the store it trains on before the first step (nothing here)."""

    def losses(self, batch: dict, train: bool) -> dict:
        """-> {"loss": scalar, metric name: scalar, ...}"""
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
        torch.manual_seed(derived_seed(self.hparams.seed, self.global_step, micro, self.global_rank))

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
        rows = min(self.hparams.val_max_rows - self._acceptance.samples, len(next(iter(batch.values()))))
        if rows > 0:
            self.simulate(batch_rows(batch, rows))

    def simulate(self, batch: dict) -> None:
        """Greedy rounds at val_gamma over every row of the batch, into this epoch's acceptance."""
        gamma = self.hparams.val_gamma
        runs = self.model.chain_runs(batch, gamma)
        for b, n in enumerate(runs.length.tolist()):
            self._acceptance.add_sample(rounds_from_runs(*runs.row(b, n), n, gamma))

    def on_validation_epoch_end(self):
        acc = self._acceptance
        self.log("val/tau", acc.tau, prog_bar=True, sync_dist=True)
        self.log("val/alpha", acc.alpha, sync_dist=True)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["drafter_type"] = self.kind
