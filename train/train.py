"""`specalign train`: train a drafter on a feature store.

    specalign train adapter=token_adapter|eagle3 store=STORE out=RUN [trainer=gpu] [resume=true]
    specalign train -m adapter.lr=1e-4,3e-4 store=STORE out=SWEEP      # one run per job: SWEEP/<n>
    specalign train hparams_search=token_adapter_optuna store=STORE out=SWEEP

A run directory holds config.yaml, metrics.csv, curves.png (rewritten at the end of every run,
also when it stops early), checkpoints/{best,last}.ckpt (best by val/tau), logs/ (the CSV
logger's versions; TensorBoard and W&B when asked) and .hydra/. `resume=true` continues from
checkpoints/last.ckpt with optimizer, scheduler and data position. Returns the best val/tau,
which the Optuna sweeper maximises.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from specalign.adapters.registry import drafter_type
from specalign.data.store import IDENTITY_KEYS, FeatureStore
from specalign.train.curves import collect_metrics, load_metrics, plot_runs
from specalign.train.datamodule import check_splits

from specalign.errors import DataError
from specalign.identity import run_identity
from specalign.io import atomic_path, claim_output, write_text
from specalign.stage import hydra_stage

log = logging.getLogger("specalign.train")


@contextmanager
def run_scope(cfg: DictConfig) -> Iterator[None]:
    """What one run changes of the process, undone when it ends: two of Lightning's warnings silenced
    (ResumableBatchSampler restarts mid-epoch at the right batch by itself, which Lightning cannot tell;
    a resumed run keeps its checkpoints directory, while a fresh run into a used one is refused) and
    W&B logging offline unless `logger.online` (or WANDB_MODE=disabled)."""
    mode = os.environ.get("WANDB_MODE")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        if not cfg.logger.online and mode != "disabled":
            os.environ["WANDB_MODE"] = "offline"
        try:
            yield
        finally:
            if mode is None:
                os.environ.pop("WANDB_MODE", None)
            else:
                os.environ["WANDB_MODE"] = mode


class SaveLast(Checkpoint):
    """checkpoints/last.ckpt every `every` optimizer steps, after every validation and when fitting ends.

    A step that a validation follows (an epoch's last step, by default) is saved after that validation
    instead: Lightning resumes a checkpoint written at such a step past the validation, so a kill right
    after it would lose the validation and best.ckpt would differ from an uninterrupted run's. Lightning
    runs Checkpoint callbacks after all others, in list order: listed after the ModelCheckpoint of
    best.ckpt (which then saves at validation end too), this one saves that callback's updated state."""

    def __init__(self, path: Path, every: int):
        self.path, self.every, self.saved_at = path, every, -1

    def _save(self, trainer) -> None:
        if trainer.global_step != self.saved_at:
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved_at = trainer.global_step

    def on_train_batch_end(self, trainer, *args):
        loop = trainer.fit_loop
        if (self.every > 0 and trainer.global_step % self.every == 0
                and not loop.epoch_loop._should_check_val_fx(loop._data_fetcher)):  # Lightning's own test
            self._save(trainer)

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are written whole or not at all: serialised in memory, then written beside the target,
    fsynced and renamed over it (specalign.io.atomic_path). A kill or a full disk leaves the previous
    best.ckpt / last.ckpt as it was, never a truncated one, and the OSError names the checkpoint."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)   # torch.save on a file turns a write error into a RuntimeError
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())


def run_dir(cfg: DictConfig) -> Path:
    """The job's own directory: `out`, or `out/<job number>` under multirun."""
    out = Path(cfg.out)
    if HydraConfig.initialized():
        job = Path(HydraConfig.get().runtime.output_dir)
        if job.parent.resolve() == out.resolve():
            return job
    return out


def is_run(path: Path) -> bool:
    """A run directory written before ownership markers: its config and checkpoints."""
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def source_info(store: FeatureStore) -> dict:
    return {"path": str(store.root), "identity": {k: store.manifest.get(k) for k in IDENTITY_KEYS}}


def build(cfg: DictConfig, store: FeatureStore):
    """-> (LightningModule, LightningDataModule) of the drafter type `adapter.kind` (adapters/registry.py)."""
    a = OmegaConf.to_container(cfg.adapter, resolve=True)
    drafter = drafter_type(a["kind"])
    model = drafter.configure(a, store, cfg.train_split)
    module = drafter.module_class(model=model.to_dict(), source=source_info(store), seed=cfg.seed,
                               optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
                               scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
                               val_gamma=cfg.val.gamma, val_max_rows=cfg.val.max_rows)
    module.init_from_store(store, cfg.train_split)
    log.info("%s: %.2fM trainable parameters", drafter.kind, module.model.num_params() / 1e6)
    data = drafter.data_module(cfg.store, model, batch_size=a["batch_size"], num_workers=cfg.num_workers,
                            prefetch=cfg.get("prefetch_batches", 2), train_split=cfg.train_split,
                            val_split=cfg.val_split, seed=cfg.seed, max_len=a["max_len"])
    return module, data


def loggers(cfg: DictConfig, run: Path) -> list:
    """CSV always; whatever `logger.extra` holds besides (W&B offline unless logger.online: `run_scope`)."""
    return [CSVLogger(run, name="logs")] + [instantiate(c) for c in cfg.logger.extra.values()]


@rank_zero_only
def write_config(run: Path, cfg: DictConfig) -> None:
    write_text(run / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def write_outputs(run: Path) -> None:
    if (run / "logs").exists():
        plot_runs({run.name: load_metrics(collect_metrics(run))}, run / "curves.png")


def train(cfg: DictConfig) -> float:
    with run_scope(cfg):
        return fit(cfg)


def fit(cfg: DictConfig) -> float:
    run = run_dir(cfg)
    check_splits(cfg.train_split, cfg.val_split)
    last = run / "checkpoints" / "last.ckpt"
    if cfg.resume and not last.exists():
        raise DataError(last, "nothing to resume from", "start the run without resume=true")
    if not cfg.resume and last.exists():
        raise DataError(run, "already holds a trained run",
                        "pass resume=true to continue it, or choose another out=")
    store = FeatureStore(cfg.store)
    claim_output(run, "train", run_identity(store.manifest, cfg.adapter.kind), cfg.get("allow_store_mismatch"),
                 is_run)
    L.seed_everything(cfg.seed, workers=True)
    module, data = build(cfg, store)
    write_config(run, cfg)
    # best.ckpt is decided at validation end (not at the epoch's end), so that SaveLast, right after it,
    # writes last.ckpt with this validation counted
    best = ModelCheckpoint(dirpath=run / "checkpoints", filename="best", monitor="val/tau", mode="max",
                           save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False,
                           save_on_train_epoch_end=False)
    trainer = L.Trainer(**cfg.trainer, logger=loggers(cfg, run), default_root_dir=run,
                        use_distributed_sampler=False, plugins=[AtomicCheckpointIO()],
                        callbacks=[best, SaveLast(last, cfg.checkpoint_every_n_steps),
                                   LearningRateMonitor(logging_interval="step")])
    try:
        trainer.fit(module, datamodule=data, ckpt_path=last if cfg.resume else None)
    except BaseException:
        if trainer.is_global_zero:     # the curves so far; the error that stopped the run is the one to report
            try:
                write_outputs(run)
            except Exception as e:  # noqa: BLE001
                log.warning("curves.png not written: %s", e)
        raise
    if trainer.is_global_zero:
        write_outputs(run)
    score = best.best_model_score
    log.info("run %s: best val/tau %s", run, None if score is None else f"{float(score):.3f}")
    return float(score) if score is not None else float("nan")


@hydra_stage("train")
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
