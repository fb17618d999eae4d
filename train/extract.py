"""`specalign extract data=... models=... out=STORE`: paired extraction into a feature store.

A Lightning predict loop: `ExtractionModule.predict_step` runs, per batch of (clip, question)
requests, batched greedy generation of both models and ONE teacher-forced pass of each model
over the target's responses, keeping only the captured layers at the response positions
(vlms/alignment.py). `StoreWriterCallback` writes each batch as one atomic shard.

Resume: rerunning the same command skips every request already in a shard (or recorded as
an error) and ends with the same store. DDP: each rank takes every world_size-th pending
request and writes its own shards; rank 0 finalizes after all ranks are done.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from data.samples import Request
from data.store import StoreWriter, split_of
from specalign.errors import SpecalignError, SystematicFailure
from specalign.stage import hydra_stage

log = logging.getLogger("specalign.extract")


class RequestList(Dataset):
    def __init__(self, requests: list[Request]):
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> Request:
        return self.requests[i]


def _collate(items: list[Request]) -> list[Request]:
    return items


def requests_of(samples, questions: list[str] | None = None) -> list[Request]:
    out = []
    for s in samples:
        for qid, q in enumerate(questions or s.questions):
            out.append(Request(sample=s, question_id=qid, question=q))
    return out


class ExtractionModule(L.LightningModule):
    """Holds the two frozen backends (built on the rank's own device in `setup`)."""

    def __init__(self, build_backends, max_new_tokens: int, ignore_eos: bool = False):
        super().__init__()
        self.build_backends = build_backends
        self.max_new_tokens = max_new_tokens
        self.ignore_eos = ignore_eos
        self.target = self.draft = None

    def setup(self, stage: str) -> None:
        if self.target is None:
            self.target, self.draft = self.build_backends(self.device)

    def layers(self) -> dict[str, list[int]]:
        return {"target": self.target.capture_layers(), "draft": self.draft.capture_layers()}

    @torch.inference_mode()
    def run(self, requests: list[Request]) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """One batch: generate with both, teacher-force both on the target's responses."""
        tb, db = self.target.prepare(requests), self.draft.prepare(requests)
        target_resp = self.target.generate(tb, self.max_new_tokens, self.ignore_eos)
        draft_resp = self.draft.generate(db, self.max_new_tokens, self.ignore_eos)
        feats = {}
        for role, backend, batch in (("target", self.target, tb), ("draft", self.draft, db)):
            layers = backend.capture_layers()
            out = backend.teacher_forced(batch, target_resp, layers)
            for name in [f"h{i}" for i in layers] + ["final"]:
                feats[f"{role}.{name}"] = torch.cat([t.to(torch.bfloat16).cpu() for t in out[name]])
        rows = []
        for req, tr, dr in zip(requests, target_resp, draft_resp):
            rows.append({"sample_id": req.sample.id, "question_id": req.question_id, "question": req.question,
                         "split": req.sample.split or split_of(req.sample.id), "duration": req.sample.duration,
                         "target_tokens": list(map(int, tr)), "draft_tokens": list(map(int, dr)),
                         "target_text": self.target.decode(tr) if hasattr(self.target, "decode") else None,
                         "draft_text": self.draft.decode(dr) if hasattr(self.draft, "decode") else None})
        return rows, feats

    def predict_step(self, batch: list[Request], batch_idx: int) -> dict[str, Any]:
        try:
            rows, feats = self.run(batch)
            return {"rows": rows, "tensors": feats, "errors": []}
        except Exception as batch_error:  # noqa: BLE001 -- isolate the bad request(s): one at a time
            if len(batch) == 1:
                return {"rows": [], "tensors": {}, "errors": [(batch[0].key, _reason(batch_error))]}
            results = [self.predict_step([r], batch_idx) for r in batch]
            rows = [row for res in results for row in res["rows"]]
            tensors = {}
            good = [res["tensors"] for res in results if res["rows"]]
            if good:
                tensors = {k: torch.cat([t[k] for t in good]) for k in good[0]}
            return {"rows": rows, "tensors": tensors, "errors": [e for res in results for e in res["errors"]]}


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


class StoreWriterCallback(BasePredictionWriter):
    """Writes each predicted batch as one shard; stops when failures are systematic."""

    def __init__(self, out: Path, manifest: dict, fail_fast_after: int = 16):
        super().__init__(write_interval="batch")
        self.out, self.manifest, self.fail_fast_after = Path(out), manifest, fail_fast_after
        self.writer: StoreWriter | None = None
        self.ok = self.failed = 0
        self.first_error: tuple[str, str] | None = None

    def setup(self, trainer, pl_module, stage) -> None:
        self.writer = StoreWriter(self.out, self.manifest, rank=trainer.global_rank)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if prediction["rows"]:
            self.writer.write_shard(prediction["rows"], prediction["tensors"])
        for key, reason in prediction["errors"]:
            self.writer.record_error(key, reason)
            self.first_error = self.first_error or (key, reason)
            log.warning("skipped %s: %s", key, reason)
        self.ok += len(prediction["rows"])
        self.failed += len(prediction["errors"])
        if self.ok == 0 and self.failed >= self.fail_fast_after:
            key, reason = self.first_error
            raise SystematicFailure(f"the first {self.failed} requests all failed; first error ({key}): {reason}")

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier()
        if trainer.global_rank == 0:
            heads = {"target.lm_head": pl_module.target.lm_head_weight(),
                     "target.embed_tokens": pl_module.target.embed_weight(),
                     "draft.lm_head": pl_module.draft.lm_head_weight()}
            self.writer.save_heads({k: v.float().cpu() for k, v in heads.items()})
        trainer.strategy.barrier()


class SamplesPerSecond(TQDMProgressBar):
    """Lightning's bar with paired samples/s."""

    def on_predict_start(self, trainer, pl_module):
        super().on_predict_start(trainer, pl_module)
        self._t0, self._n = time.perf_counter(), 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._n += len(batch)
        rate = self._n / max(time.perf_counter() - self._t0, 1e-9)
        self.predict_progress_bar.set_postfix({"samples/s": f"{rate:.2f}"})


def store_manifest(target, draft, cfg_gen: dict, data_info: dict) -> dict:
    return {
        "kind": "full",
        "target": target.identity(), "draft": draft.identity(),
        "layers": {"target": target.capture_layers(), "draft": draft.capture_layers()},
        "dtype": "bfloat16",
        "prompts": {"target": target.prompt_template(), "draft": draft.prompt_template()},
        "generation": cfg_gen,
        "data": data_info,
    }


def pending_for_rank(requests: list[Request], done: set[str], rank: int, world: int) -> list[Request]:
    pending = [r for r in requests if r.key not in done]
    return pending[rank::world]


def extract(cfg: DictConfig) -> Path:
    from data.dsec import load_from_config
    from vlms.registry import build_backends

    out = Path(cfg.out)
    samples, errors = load_from_config(cfg.data)
    requests = requests_of(samples)
    if cfg.get("limit"):
        requests = requests[: cfg.limit]
    if not requests:
        raise SpecalignError(f"{cfg.data.root}: no readable samples" + (f" (first error: {errors[0]})" if errors else ""))
    gen = {"max_new_tokens": cfg.max_new_tokens, "do_sample": False, "ignore_eos": cfg.ignore_eos}

    module = ExtractionModule(lambda device: build_backends(cfg.models, device), cfg.max_new_tokens, cfg.ignore_eos)
    trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), logger=False,
                        use_distributed_sampler=False, enable_model_summary=False,
                        callbacks=[SamplesPerSecond()])
    # the manifest needs the models' identity: build them on this rank's own device first
    module.target, module.draft = build_backends(cfg.models, trainer.strategy.root_device)
    manifest = store_manifest(module.target, module.draft, gen,
                              {"root": str(cfg.data.root), "duration": cfg.data.get("duration")})
    writer_cb = StoreWriterCallback(out, manifest, cfg.fail_fast_after)
    trainer.callbacks.append(writer_cb)
    writer = StoreWriter(out, manifest, rank=trainer.global_rank)
    for e in errors:  # unreadable samples found while reading the dataset
        if e["id"] not in writer.error_keys():
            writer.record_error(str(e["id"]), e["reason"])
    todo = pending_for_rank(requests, writer.done_keys(), trainer.global_rank, trainer.world_size)
    loader = DataLoader(RequestList(todo), batch_size=cfg.batch_size, collate_fn=_collate, num_workers=0)
    if todo:
        trainer.predict(module, loader, return_predictions=False)
    trainer.strategy.barrier()
    if trainer.global_rank == 0:
        if writer_cb.writer is None:  # nothing was pending: only heads and finalize
            writer.save_heads({k: v.float().cpu() for k, v in {
                "target.lm_head": module.target.lm_head_weight(),
                "target.embed_tokens": module.target.embed_weight(),
                "draft.lm_head": module.draft.lm_head_weight()}.items()})
        writer.finalize({"questions": sorted({r.question for r in requests})})
    return out


@hydra_stage("extract")
def main(cfg: DictConfig) -> None:
    out = extract(cfg)
    from data.store import FeatureStore

    store = FeatureStore(out)
    c = store.manifest["counts"]
    print(f"feature store {out}: {c['rows']} rows, {c['tokens']} target tokens, {c['errors']} skipped, "
          f"splits {c['splits']}")
