"""`specalign extract data=... models=... out=STORE`: paired extraction into a feature store.

A Lightning predict loop: `ExtractionModule.predict_step` runs, per batch of (clip, question)
requests, batched greedy generation of both models. The target's feature rows are captured
while it generates (row j is the position whose prediction is r_j: vlms/alignment.py); the
draft reuses its prompt cache for one teacher-forced pass over the target's responses. Only
the captured layers at the response positions are kept. `StoreWriterCallback` writes each
batch as one atomic shard.

Inputs are prepared off the main thread (`InputPrefetch`, the loader's collate): a batch's event
check, clip decoding, preprocessing and prompts start on host threads when the loader yields it,
and Lightning's loop fetches one batch ahead, so the next batch is ready when the GPU finishes
this one (`input_threads` clips at a time; 0: everything inline, as before).

Bad samples: a clip whose files are missing or damaged (its raw events are read and validated
once, data.dsec.EventCheck), a request that fails in the models and a row whose features hold
NaN or inf are skipped and recorded in errors.jsonl (request key, file, reason), one line per
(clip, question) request, so that written + skipped = requested; the run stops when every request
so far failed (`fail_fast_after`).

Resume: rerunning the same command skips every request already in a shard (or recorded as
an error) and ends with the same store. DDP: the pending requests are cut into batches as a
single process would cut them, rank r takes every world_size-th batch and writes its own
shards; after a barrier rank 0 saves the heads and finalizes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf
from specalign.data.dsec import EventCheck
from specalign.data.features import PROMPT, PROMPT_TOKEN, VIDEO, context_name, feature_name, layer_key
from specalign.data.layouts import dataset_entry
from specalign.data.samples import Request, requests_of
from specalign.data.store import StoreWriter, drop_nonfinite, is_store, split_of
from specalign.vlms.alignment import prompt_row_position, video_summary
from torch.utils.data import DataLoader, Dataset

from specalign.errors import ConfigError, DataError, SpecalignError, SystematicFailure
from specalign.io import claim_output
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


class Inputs:
    """A batch's inputs prepared on the host: the event check of each request, then both models' batches of
    the requests that passed it (or the error preparing them raised: the batch then runs request by request)."""

    def __init__(self, bad: dict[str, DataError | None], target=None, draft=None, error: Exception | None = None):
        self.bad, self.target, self.draft, self.error = bad, target, draft, error


class PreparedBatch:
    """The loader's item with `InputPrefetch`: the batch's requests and the future of their `Inputs`."""

    def __init__(self, requests: list[Request], inputs: Future):
        self.requests, self.inputs = requests, inputs

    def __len__(self) -> int:
        return len(self.requests)


class InputPrefetch:
    """The DataLoader's collate_fn: hands each batch over at once with its inputs being prepared on a host
    thread (`Inputs`), the per-clip media loads `threads` at a time. Lightning's predict loop fetches one
    batch ahead, so batch i + 1 is prepared while the GPU decodes batch i. `close` ends the threads."""

    def __init__(self, module: ExtractionModule, threads: int):
        self.module = module
        self.batches = ThreadPoolExecutor(1, thread_name_prefix="inputs")
        self.media = ThreadPoolExecutor(max(threads, 1), thread_name_prefix="media")

    def __call__(self, requests: list[Request]) -> PreparedBatch:
        return PreparedBatch(requests, self.batches.submit(self.prepare, requests))

    def prepare(self, requests: list[Request]) -> Inputs:
        m = self.module
        bad = {r.key: m.events(r.sample) for r in requests}
        good = [r for r in requests if bad[r.key] is None]
        if not good:
            return Inputs(bad)
        try:
            return Inputs(bad, *(b.prepare(good, on_host=True, media_map=self.media.map) for b in (m.target, m.draft)))
        except Exception as e:  # noqa: BLE001 -- the batch then runs request by request, each error recorded
            return Inputs(bad, error=e)

    def close(self) -> None:
        self.batches.shutdown(cancel_futures=True)
        self.media.shutdown(cancel_futures=True)


def make_loader(module: ExtractionModule, requests: list[Request], batch_size: int, input_threads: int):
    """-> (the predict loop's DataLoader, its InputPrefetch or None with input_threads=0)."""
    prefetch = InputPrefetch(module, input_threads) if input_threads > 0 else None
    loader = DataLoader(RequestList(requests), batch_size=batch_size, collate_fn=prefetch or _collate, num_workers=0)
    return loader, prefetch


class ExtractionModule(L.LightningModule):
    """Holds the two frozen backends (already on the rank's own device)."""

    def __init__(self, target, draft, max_new_tokens: int, ignore_eos: bool = False,
                 events: EventCheck | None = None):
        super().__init__()
        self.target, self.draft = target, draft
        self.max_new_tokens = max_new_tokens
        self.ignore_eos = ignore_eos
        self.events = events or EventCheck()
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a rank may have no batch left

    def use_fast_decode(self, cuda_graphs: bool | str = "auto", compile: bool | str = "auto") -> None:
        use_fast_decode((self.target, self.draft), cuda_graphs, compile)

    @torch.inference_mode()
    def run(self, requests: list[Request], inputs: Inputs | None = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """One batch: the target's greedy responses with its feature rows captured while it decodes (no
        second pass over its prompt); the draft's prompt prefilled once, for its own greedy responses and
        for its teacher-forced rows on the target's responses (`HFBackend.generate_and_teacher_force`).
        Rows equal `teacher_forced`'s up to floating-point noise (tests/test_vlm_backends.py). `inputs`: the
        requests' batches prepared on the host (`InputPrefetch`); None: prepared here."""
        if inputs is not None:
            tb, db = inputs.target.to(self.target.device), inputs.draft.to(self.draft.device)
        else:
            tb, db = self.target.prepare(requests), self.draft.prepare(requests)
        target_layers, draft_layers = self.target.capture_layers(), self.draft.capture_layers()
        with capture_prompt_context(self.target, tb, target_layers) as context:   # from the same prefill
            target_resp, target_feats = self.target.generate(tb, self.max_new_tokens, self.ignore_eos,
                                                             capture_layers=target_layers)
        draft_resp, draft_feats = self.draft.generate_and_teacher_force(db, self.max_new_tokens, target_resp,
                                                                        draft_layers, self.ignore_eos)
        feats = {}
        for role, layers, out in (("target", target_layers, target_feats), ("draft", draft_layers, draft_feats)):
            for layer in [*layers, None]:
                rows = [t.to(torch.bfloat16).cpu() for t in out[layer_key(layer)]]
                feats[feature_name(role, layer)] = torch.cat(rows)
        feats |= context.tensors()
        rows = []
        for req, tr, dr in zip(requests, target_resp, draft_resp):
            rows.append({"sample_id": req.sample.id, "question_id": req.question_id, "question": req.question,
                         "split": req.sample.split or split_of(req.sample.id), "duration": req.sample.duration,
                         "target_tokens": list(map(int, tr)), "draft_tokens": list(map(int, dr)),
                         "target_text": self.target.decode(tr), "draft_text": self.draft.decode(dr)})
        return rows, feats

    def predict_step(self, batch: list[Request] | PreparedBatch, batch_idx: int) -> dict[str, Any]:
        """-> {"rows", "tensors", "errors": [(key, reason, path)]}: requests of clips with damaged events are
        not run, rows with non-finite features not kept. A `PreparedBatch` brings its event check and inputs."""
        inputs = batch.inputs.result() if isinstance(batch, PreparedBatch) else None
        batch = batch.requests if isinstance(batch, PreparedBatch) else batch
        bad = inputs.bad if inputs is not None else {r.key: self.events(r.sample) for r in batch}
        errors = [(key, _reason(e), e.path) for key, e in bad.items() if e is not None]
        out = self.run_isolated([r for r in batch if bad[r.key] is None],
                                inputs if inputs is not None and inputs.error is None else None)
        rows, tensors, nonfinite = drop_nonfinite(out["rows"], out["tensors"])
        return {"rows": rows, "tensors": tensors,
                "errors": errors + out["errors"] + [(key, reason, None) for key, reason in nonfinite]}

    def run_isolated(self, batch: list[Request], inputs: Inputs | None = None) -> dict[str, Any]:
        """`run`, and when the batch fails, each request on its own: one bad request costs only itself."""
        if not batch:
            return {"rows": [], "tensors": {}, "errors": []}
        try:
            rows, feats = self.run(batch, inputs)
            return {"rows": rows, "tensors": feats, "errors": []}
        except Exception as batch_error:  # noqa: BLE001 -- isolate the bad request(s): one at a time
            if len(batch) == 1:
                path = batch_error.path if isinstance(batch_error, DataError) else None
                return {"rows": [], "tensors": {}, "errors": [(batch[0].key, _reason(batch_error), path)]}
            results = [self.run_isolated([r]) for r in batch]
            rows = [row for res in results for row in res["rows"]]
            tensors = {}
            good = [res["tensors"] for res in results if res["rows"]]
            if good:
                tensors = {k: torch.cat([t[k] for t in good]) for k in good[0]}
            return {"rows": rows, "tensors": tensors, "errors": [e for res in results for e in res["errors"]]}


def use_fast_decode(backends, cuda_graphs: bool | str = "auto", compile: bool | str = "auto") -> None:
    """The backends decode through `vlms.batch_decode.BatchDecoder` (static KV cache only; the same tokens
    and rows). "auto": on when the model is on a CUDA device (graphs, fused ops are CUDA-only)."""
    for backend in backends:
        on_cuda = backend.device.type == "cuda"
        backend.use_batch_decoder(_switch(cuda_graphs, "decode.cuda_graphs", on_cuda),
                                  _switch(compile, "decode.compile", on_cuda))


def _switch(value, key: str, on_cuda: bool) -> bool:
    if value == "auto":
        return on_cuda
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}={value!r}: expected auto, true or false")


VIDEO_ROWS_POOL = "mean over equal contiguous runs of the video positions, one run per frame"


def context_spec(target) -> dict | None:
    """The manifest's "context" (data/store.py): which target features each row's prompt context holds and
    how many video rows; None for a target without video positions."""
    frames = getattr(target, "num_frames", None)
    if not frames or getattr(target.model.config, "video_token_index", None) is None:
        return None
    layers = list(dict.fromkeys(target.capture_layers()))
    return {"features": [feature_name("target", i) for i in layers], "video_rows": int(frames),
            "video_token_id": int(target.model.config.video_token_index), "pool": VIDEO_ROWS_POOL}


class PromptContext:
    """What `capture_prompt_context` keeps of one batch's prefill (B requests, left padded to width L)."""

    def __init__(self, batch, spec: dict):
        self.ids = batch.inputs["input_ids"]                                  # [B, L]
        self.spec, self.found = spec, {}

    def keep(self, name: str, hidden: torch.Tensor) -> None:
        """Hook of the input of decoder layer `name` ("h{i}"): only the prefill's forward (width L) counts."""
        feature = f"target.{name}"                                             # features.feature_name
        if feature not in self.spec["features"] or hidden.shape[1] != self.ids.shape[1] or feature in self.found:
            return
        video_id, K = self.video_id, self.spec["video_rows"]
        prompt = hidden[:, prompt_row_position(self.ids.shape[1])]                       # [B, H]; pad 0
        video = torch.stack([video_summary(h, i, video_id, K) for h, i in zip(hidden, self.ids)])   # [B, K, H]
        self.found[feature] = (prompt.to(torch.bfloat16).cpu(), video.flatten(0, 1).to(torch.bfloat16).cpu())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Store tensors, one row after the other (data/features.py names); empty without a spec."""
        missing = [f for f in self.spec["features"] if f not in self.found] if self.spec else []
        if missing:
            raise SpecalignError(f"the target's prefill over the whole prompt was not seen for {missing}: the "
                                 "prompt context is captured from it (train/extract.py capture_prompt_context)")
        out = {PROMPT_TOKEN: self.ids[:, -1].long().cpu()} if self.spec else {}
        for feature, (prompt, video) in self.found.items():
            out[context_name(PROMPT, feature)] = prompt
            out[context_name(VIDEO, feature)] = video
        return out


@contextmanager
def capture_prompt_context(target, batch, layers) -> Iterator[PromptContext]:
    """While the target generates, keep each request's prompt context from its prefill (the forward over
    the whole prompt): per captured layer the prompt row (vlms.alignment.prompt_row_position) and the
    video summary (vlms.alignment.video_summary), and the last prompt token. Hooks only: the decode loop
    is untouched and no second pass over the prompt runs."""
    from specalign.vlms.hf_backend import hook_layers

    spec = context_spec(target)
    ctx = PromptContext(batch, spec or {})
    if spec is None:
        yield ctx
        return
    ctx.video_id = int(target.model.config.video_token_index)
    with hook_layers(target.decoder, layers, ctx.keep):
        yield ctx


def _reason(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())  # one line


class StoreWriterCallback(BasePredictionWriter):
    """Writes each predicted batch as one shard; stops when failures are systematic.

    Failures are held back until this rank's first success: a run stopped as systematic records
    none of them, so a rerun after fixing the cause retries those requests."""

    def __init__(self, writer: StoreWriter, fail_fast_after: int = 16):
        super().__init__(write_interval="batch")
        self.writer, self.fail_fast_after = writer, fail_fast_after
        self.ok = self.failed = 0
        self.held: list[tuple[str, str, str | None]] = []   # (request key, reason, file at fault)
        self.first_error: tuple[str, str, str | None] | None = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if prediction["rows"]:
            self.writer.write_shard(prediction["rows"], prediction["tensors"])
        for key, reason, path in prediction["errors"]:
            log.warning("skipped %s: %s", key, reason)
            self.first_error = self.first_error or (key, reason, path)
        self.held += prediction["errors"]
        self.ok += len(prediction["rows"])
        self.failed += len(prediction["errors"])
        if self.ok:
            self.record_errors()
        elif self.failed >= self.fail_fast_after:
            raise self.systematic()

    def record_errors(self) -> None:
        for key, reason, path in self.held:
            self.writer.record_error(key, reason, path)
        self.held = []

    def systematic(self) -> SystematicFailure:
        if self.first_error is None:
            return SystematicFailure(f"{self.writer.root}: no request succeeded (see the other ranks' errors)")
        key, reason, _ = self.first_error
        return SystematicFailure(f"the first {self.failed} requests all failed, stopping; first error ({key}): "
                                 f"{reason}")


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

    def on_exception(self, trainer, pl_module, exception):
        if self._predict_progress_bar is not None:  # end the bar's line before the error is printed
            self._predict_progress_bar.close()


def model_identity(backend, models_cfg) -> dict:
    """The backend's identity; the tiny pair's weights come from a seed, not a path, so it is part of it."""
    ident = backend.identity()
    if models_cfg.get("tiny"):
        ident["seed"] = int(models_cfg.get("seed", 0))
    return ident


def store_manifest(target, draft, cfg: DictConfig) -> dict:
    return {
        "kind": "full",
        "target": model_identity(target, cfg.models), "draft": model_identity(draft, cfg.models),
        "layers": {"target": target.capture_layers(), "draft": draft.capture_layers()},
        "dtype": "bfloat16",
        "prompts": {"target": target.prompt_template(), "draft": draft.prompt_template()},
        "generation": {"max_new_tokens": cfg.max_new_tokens, "do_sample": False, "ignore_eos": cfg.ignore_eos},
        "data": dataset_entry(cfg.data),
        **({"context": spec} if (spec := context_spec(target)) else {}),
    }


def dataset_record(out: Path, cfg: DictConfig, requests: list[Request]) -> dict:
    """Manifest keys listing every dataset extracted into this store (one store may hold the 1 s
    and the 500 ms clips, written by two runs) and the union of their questions."""
    old = json.loads((Path(out) / "manifest.json").read_text())
    this = dataset_entry(cfg.data)
    datasets = [d for d in old.get("datasets", []) if d != this] + [this]
    questions = sorted(set(old.get("questions") or []) | {r.question for r in requests})
    return {"datasets": datasets, "questions": questions}


def heads_of(target, draft) -> dict[str, torch.Tensor]:
    heads = {"target.lm_head": target.lm_head_weight(), "target.embed_tokens": target.embed_weight(),
             "draft.lm_head": draft.lm_head_weight()}
    return {k: v.float().cpu() for k, v in heads.items()}


def pending_for_rank(requests: list[Request], done: set[str], rank: int, world: int,
                     batch_size: int) -> list[Request]:
    """This rank's share of the pending requests: every world-th batch of them, so that each batch holds
    what a single process would batch together (same padding, same numbers in the store)."""
    pending = [r for r in requests if r.key not in done]
    batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
    return [r for batch in batches[rank::world] for r in batch]


def remove_stale_temp_files(root: Path) -> None:
    """Temp files of a killed run (atomic writes that never got renamed)."""
    for tmp in [*root.glob(".*.tmp"), *root.glob("shards/.*.tmp")]:
        tmp.unlink(missing_ok=True)


def record_dataset_errors(writer: StoreWriter, errors: list[dict]) -> None:
    """Rows of the dataset index that could not be read: one error per request they stand for."""
    known = set(writer.error_keys())
    for e in errors:
        for key in (f"{e['id']}#{q}" for q in range(e.get("requests", 1))):
            if key not in known:
                writer.record_error(key, e["reason"], e.get("path"))


def load_requests(cfg: DictConfig) -> tuple[list[Request], list[dict]]:
    from specalign.data.layouts import load_from_config

    samples, errors = load_from_config(cfg.data)
    requests = requests_of(samples)
    if cfg.get("limit"):
        requests = requests[: cfg.limit]
    if not requests:
        raise SpecalignError(f"{cfg.data.root}: no readable samples" + (f" (first error: {errors[0]})" if errors else ""))
    return requests, errors


def extract(cfg: DictConfig) -> Path | None:
    """Run the extraction; returns the finished store on rank 0, None on the other ranks."""
    from specalign.vlms.registry import build_backends

    out = Path(cfg.out)
    requests, errors = load_requests(cfg)
    trainer = L.Trainer(**OmegaConf.to_container(cfg.trainer, resolve=True), logger=False,
                        use_distributed_sampler=False, enable_model_summary=False,
                        callbacks=[SamplesPerSecond()])
    rank, world = trainer.global_rank, trainer.world_size  # known before the launcher starts the other ranks
    target, draft = build_backends(cfg.models, trainer.strategy.root_device)
    if cfg.decode.fast:  # before out= is claimed: a decode.* the device refuses leaves nothing behind
        use_fast_decode((target, draft), cfg.decode.cuda_graphs, cfg.decode.compile)
    claim_output(out, "extract", owned_if=is_store)   # the store's identity is its manifest (StoreWriter)
    writer = StoreWriter(out, store_manifest(target, draft, cfg), rank=rank)
    if rank == 0:  # the other ranks start inside trainer.predict, or write nothing before its setup barrier
        remove_stale_temp_files(out)
        record_dataset_errors(writer, errors)
    callback = StoreWriterCallback(writer, cfg.fail_fast_after)
    trainer.callbacks.append(callback)
    done = writer.done_keys()
    if any(r.key not in done for r in requests):  # every rank sees the same: nobody has written yet
        mine = pending_for_rank(requests, done, rank, world, cfg.batch_size)
        module = ExtractionModule(target, draft, cfg.max_new_tokens, cfg.ignore_eos, EventCheck.of(cfg.data))
        loader, prefetch = make_loader(module, mine, cfg.batch_size, cfg.input_threads)
        try:
            trainer.predict(module, loader, return_predictions=False)
        finally:
            if prefetch is not None:
                prefetch.close()
        trainer.strategy.barrier()  # every rank has written its shards
    if not any(writer.shard_dir.glob("*.safetensors")):
        raise callback.systematic()
    callback.record_errors()
    trainer.strategy.barrier()  # ... and its errors
    if rank != 0:
        return None
    writer.save_heads(heads_of(target, draft))
    writer.finalize(dataset_record(out, cfg, requests))
    return out


@hydra_stage("extract")
def main(cfg: DictConfig) -> None:
    out = extract(cfg)
    if out is None:  # rank 0 reports
        return
    from specalign.data.store import FeatureStore

    store = FeatureStore(out)
    c = store.manifest["counts"]
    print(f"feature store {out}: {c['rows'] + c['errors']} requests, {c['rows']} written, {c['errors']} skipped"
          f"{' (reasons in errors.jsonl)' if c['errors'] else ''}; {c['tokens']} target tokens, "
          f"splits {c['splits']}")
