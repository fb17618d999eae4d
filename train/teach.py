"""`specalign teach world=DIR [out=DIR]`: teach the tiny VLM pair to describe the synthetic world.

Random-weight tiny models emit noise, so acceptance measured on them says nothing. Teaching fixes
that: on the world's train clips the target (tiny Video-LLaVA) learns the target-style reference
answers (they name colours) from its video frames, the draft (tiny EventGPT) the draft-style ones
(other words, no colour) from its event frames. Teacher-forced cross-entropy on the answer tokens
only; prompts come from the backends' own `prepare`, so they are the extraction's prompts token for
token. Afterwards both answer in sentences about the clip and the raw draft is rarely accepted.

`cached_teach` keeps each taught pair under `<cache_root>/<key>/{target,draft}`, the key a hash of
everything that shapes it (world, teach config, tiny model configs, vocabulary, CODE_VERSION). An
entry is trained in a temp directory and renamed into place when complete, `done.json` last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import DictConfig, OmegaConf
from specalign.data.layouts import reader
from specalign.data.samples import Request, Sample, requests_of
from specalign.data.synth import WorldConfig
from specalign.specdec.metrics import greedy_acceptance, raw_draft_proposer
from specalign.vlms.eventgpt_backend import EventGPTBackend
from specalign.vlms.hf_backend import HFBackend, config_hash, left_pad, positions_from_mask
from specalign.vlms.tiny import build_tokenizer, tiny_draft_config, tiny_pair, tiny_target_config
from specalign.vlms.video_llava_backend import VideoLlavaBackend
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from specalign.errors import DataError
from specalign.io import claim_output, write_json
from specalign.paths import CONF_DIR
from specalign.runtime import torch_threads
from specalign.stage import hydra_stage

log = logging.getLogger("specalign.teach")

CODE_VERSION = 1
IGNORE = -100
TEXT_INPUTS = ("input_ids", "attention_mask")
WORLD_VOLATILE = ("out", "workers")   # synth keys that do not change what is written
RAW_GAMMA = 5
ROLES = ("target", "draft")
TOWER = "_tower."                      # in the parameter names of both models' CLIP towers


# ------------------------------------------------------------------------------------------ data

@dataclass
class Example:
    request: Request
    prompt: list[int]                  # the backend's prompt ids, media placeholders expanded
    answer: list[int]                  # reference answer ids + EOS
    media: dict[str, torch.Tensor]     # the clip's frames (shared by its questions)


def load_world(world_dir: str | Path, durations: Sequence[str], clips: int | None) -> list[Sample]:
    """The first `clips` clips of each duration of a synthetic world directory."""
    samples = []
    for duration in durations:
        samples += reader("synthetic")(Path(world_dir) / f"synthetic_{duration}", limit=clips, strict=True)[0]
    return samples


def split(samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """(train clips, held-out clips): the val split, or the test split when the world has no val clips."""
    held_out = [s for s in samples if s.split == "val"] or [s for s in samples if s.split == "test"]
    return [s for s in samples if s.split == "train"], held_out


def reference(request: Request, style: str) -> str:
    references = request.sample.meta.get("references")
    if not references:
        raise DataError(request.sample.id, "no reference answers: not a synthetic world",
                        hint="write one with `specalign synth out=DIR`")
    return references[style][request.question_id]


def examples(backend: HFBackend, samples: list[Sample]) -> list[Example]:
    """One example per (clip, question), answers in the backend's own style."""
    out = []
    for sample in samples:
        requests = requests_of([sample])
        batch = backend.prepare(requests)
        media = {k: v[0] for k, v in batch.inputs.items() if k not in TEXT_INPUTS}
        ids = batch.inputs["input_ids"]
        for b, (request, n) in enumerate(zip(requests, batch.prompt_lens)):
            answer = backend.tokenizer(reference(request, backend.role), add_special_tokens=False).input_ids
            out.append(Example(request, ids[b, ids.shape[1] - n:].tolist(), answer + [backend.eos_id], media))
    return out


def collate(items: list[Example], pad_id: int) -> dict:
    """[prompt | answer] per example, left padded as a whole; labels on the answer tokens only."""
    input_ids, attention_mask = left_pad([e.prompt + e.answer for e in items], pad_id)
    labels = torch.full_like(input_ids, IGNORE)
    for b, e in enumerate(items):
        labels[b, labels.shape[1] - len(e.answer):] = torch.tensor(e.answer)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "media": {k: torch.stack([e.media[k] for e in items]) for k in items[0].media},
            "requests": [e.request for e in items], "prompts": [e.prompt for e in items],
            "answers": [e.answer for e in items]}


def loader(items: list[Example], pad_id: int, batch_size: int, seed: int | None = None) -> DataLoader:
    """Shuffled with `seed`, in order without."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(items, batch_size=batch_size, shuffle=seed is not None, generator=generator,
                      collate_fn=lambda b: collate(b, pad_id))


# ------------------------------------------------------------------------------------------ model

def token_accuracy(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Fraction of reference positions where the output holds the same token."""
    hits = sum(sum(int(o == r) for o, r in zip(out, ref)) for out, ref in zip(outputs, references))
    return hits / max(sum(len(r) for r in references), 1)


class TeachModule(L.LightningModule):
    """One VLM of the pair, trained on its reference answers; validation decodes greedily."""

    def __init__(self, backend: HFBackend, lr: float, weight_decay: float, warmup: float, max_new_tokens: int,
                 freeze_towers: bool = True):
        super().__init__()
        self.backend = backend
        self.model = backend.model.train()
        self.lr, self.weight_decay, self.warmup = lr, weight_decay, warmup
        self.max_new_tokens = max_new_tokens
        for name, param in self.model.named_parameters():
            param.requires_grad_(not (freeze_towers and TOWER in name))

    def answer_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy and teacher-forced token accuracy on the answer tokens."""
        mask = batch["attention_mask"]
        logits = self.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions_from_mask(mask),
                            **batch["media"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)
        known = labels != IGNORE
        return loss, (logits.argmax(-1) == labels)[known].float().mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, accuracy = self.answer_loss(batch)
        self.log_dict({"loss": loss, "acc": accuracy}, prog_bar=True, batch_size=len(batch["answers"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, accuracy = self.answer_loss(batch)
        prompt_batch = self.backend.make_batch(batch["requests"], batch["prompts"], batch["media"])
        outputs = self.backend.generate(prompt_batch, self.max_new_tokens)
        exact = sum(o == a for o, a in zip(outputs, batch["answers"])) / len(outputs)
        self.log_dict({"val_loss": loss, "val_acc": accuracy, "val_exact": exact,
                       "val_gen_acc": token_accuracy(outputs, batch["answers"])},
                      prog_bar=True, batch_size=len(outputs))

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.lr, weight_decay=self.weight_decay)
        total = self.trainer.estimated_stepping_batches
        schedule = get_cosine_schedule_with_warmup(optimizer, int(self.warmup * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class RoleProgressBar(TQDMProgressBar):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(f"teach {self.role} {trainer.current_epoch + 1}/{trainer.max_epochs}")


class EpochLines(L.Callback):
    """One printed line per epoch: the progress of a model taught in a second process."""

    def __init__(self, role: str):
        self.role = role

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = ", ".join(f"{k} {float(v):.3f}" for k, v in trainer.progress_bar_metrics.items())
        print(f"teach {self.role} {trainer.current_epoch + 1}/{trainer.max_epochs}: {metrics}", flush=True)


def fit(backend: HFBackend, train: list[Sample], held_out: list[Sample], cfg: Mapping, progress: L.Callback) -> dict:
    """Teach one backend's model its style of reference answers; returns the last logged metrics."""
    train_items, val_items = examples(backend, train), examples(backend, held_out[: cfg["val_clips"]])
    module = TeachModule(backend, cfg["lr"], cfg["weight_decay"], cfg["warmup"], cfg["max_new_tokens"],
                         cfg["freeze_towers"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=cfg["epochs"], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        enable_progress_bar=isinstance(progress, TQDMProgressBar), callbacks=[progress],
                        gradient_clip_val=cfg["grad_clip"], check_val_every_n_epoch=cfg["val_every"])
    trainer.fit(module, loader(train_items, backend.pad_id, cfg["batch_size"], cfg["seed"]),
                loader(val_items, backend.pad_id, cfg["batch_size"]) if val_items else None)
    backend.model.eval()
    return {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()}


def teach_role(role: str, world_dir: str | Path, out_dir: str | Path, cfg: Mapping, bar: bool = True) -> dict:
    """Teach the `role` model of the tiny pair of seed `cfg.seed` and save it (+ tokenizer) to out_dir/role."""
    with torch_threads(1):   # tiny models train fastest on one torch thread
        started = time.perf_counter()
        train, held_out = split(load_world(world_dir, cfg["durations"], cfg["clips"]))
        if not train:
            raise DataError(world_dir, "the world has no train clips", hint="synthesize more clips")
        target, draft, tokenizer = tiny_pair(cfg["seed"])
        backend = VideoLlavaBackend(target, tokenizer) if role == "target" else EventGPTBackend(draft, tokenizer)
        metrics = fit(backend, train, held_out, cfg, RoleProgressBar(role) if bar else EpochLines(role))
        backend.model.save_pretrained(Path(out_dir) / role)
        tokenizer.save_pretrained(Path(out_dir) / role)
        return {**metrics, "train_clips": len(train), "seconds": round(time.perf_counter() - started, 1)}


def teach_pair(world_dir: str | Path, out_dir: str | Path, cfg: Mapping, parallel: bool = True
               ) -> tuple[Path, Path]:
    """Teach both models (`cfg`: conf/teach.yaml's `teach` keys, missing ones take its defaults) on the
    world's train clips; write `out_dir/target`, `out_dir/draft` (loadable by the backends' `from_pretrained`) and
    `out_dir/teach.json`. `parallel`: the draft in a second process meanwhile, one core each."""
    cfg = teach_settings(cfg)
    if parallel:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            draft = pool.submit(teach_role, "draft", world_dir, out_dir, cfg, bar=False)
            report = {"target": teach_role("target", world_dir, out_dir, cfg), "draft": draft.result()}
    else:
        report = {role: teach_role(role, world_dir, out_dir, cfg) for role in ROLES}
    write_json(Path(out_dir) / "teach.json", report)
    return Path(out_dir) / "target", Path(out_dir) / "draft"


# ------------------------------------------------------------------------------------------ cache

def plain(cfg: Mapping) -> dict:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def teach_settings(cfg: Mapping) -> dict:
    """conf/teach.yaml's `teach` defaults updated with `cfg`; unknown keys are refused."""
    defaults = plain(OmegaConf.load(CONF_DIR / "teach.yaml").teach)
    unknown = set(plain(cfg)) - set(defaults)
    if unknown:
        raise ValueError(f"unknown teach settings {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **plain(cfg)}


def world_config(world_dir: str | Path) -> dict:
    """The synth config a world was written with (saved by `specalign synth`), else a fingerprint of its
    index files; `out` is the directory itself."""
    world_dir = Path(world_dir)
    saved = world_dir / ".hydra" / "synth" / "config.yaml"
    if saved.is_file():
        return {**plain(OmegaConf.load(saved)), "out": str(world_dir)}
    indexes = sorted(world_dir.glob("synthetic_*/synthetic_*.json"))
    if not indexes:
        raise DataError(world_dir, "not a synthetic world directory", hint="write one with `specalign synth out=DIR`")
    return {"out": str(world_dir),
            "index_sha256": {p.parent.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in indexes}}


def cache_inputs(world_cfg: Mapping, teach_cfg: Mapping) -> dict:
    """Everything the taught pair depends on."""
    tokenizer = build_tokenizer()
    world = {**dataclasses.asdict(WorldConfig()), **plain(world_cfg)}    # synth's defaults made explicit
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]))
    return {"world": {k: v for k, v in world.items() if k not in WORLD_VOLATILE},
            "teach": teach_settings(teach_cfg),
            "models": {"target": config_hash(tiny_target_config(tokenizer)),
                       "draft": config_hash(tiny_draft_config(tokenizer))},
            "vocabulary": hashlib.sha256(vocabulary.encode()).hexdigest()[:16],
            "code_version": CODE_VERSION}


def cache_key(world_cfg: Mapping, teach_cfg: Mapping) -> str:
    text = json.dumps(cache_inputs(world_cfg, teach_cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_teach(world_cfg: Mapping, teach_cfg: Mapping, cache_root: str | Path, parallel: bool = True
                 ) -> tuple[Path, Path]:
    """(target_dir, draft_dir) of the pair taught with `teach_cfg` on the world in `world_cfg["out"]`, which
    synth wrote with (the rest of) `world_cfg`: reused from `cache_root` when its entry is complete, else
    taught in a temp directory renamed into place at the end."""
    key = cache_key(world_cfg, teach_cfg)
    entry = Path(cache_root) / key
    if (entry / "done.json").is_file():
        log.info("taught pair from the cache: %s", entry)
        return entry / "target", entry / "draft"
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    try:
        teach_pair(world_cfg["out"], tmp, teach_cfg, parallel)
        write_json(tmp / "done.json", {"key": key, **cache_inputs(world_cfg, teach_cfg)})
        if not (entry / "done.json").is_file():   # else a concurrent run finished first: keep that one
            shutil.rmtree(entry, ignore_errors=True)
            tmp.chmod(0o755)
            tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry / "target", entry / "draft"


# ------------------------------------------------------------------------------------------ report

def compare(target_dir: str | Path, draft_dir: str | Path, samples: list[Sample], max_new_tokens: int,
            gamma: int = RAW_GAMMA) -> dict:
    """Greedy answers of both saved models on `samples`, their token accuracy against the references,
    and the raw draft's acceptance by the target (τ, α at `gamma`)."""
    target = VideoLlavaBackend.from_pretrained(target_dir, quant="fp32")
    draft = EventGPTBackend.from_pretrained(draft_dir, quant="fp32")
    rows = []
    for sample in samples:
        requests = requests_of([sample])
        answers = [b.generate(b.prepare(requests), max_new_tokens) for b in (target, draft)]
        for request, t, d in zip(requests, *answers):
            rows.append({"question": request.question, "target_tokens": t, "draft_tokens": d,
                         "target": target.decode(t), "draft": draft.decode(d),
                         "reference": reference(request, "target"),
                         "draft_reference": reference(request, "draft")})
    accuracy = {role: token_accuracy([r[f"{role}_tokens"] for r in rows],
                                     [target.tokenizer(r[ref], add_special_tokens=False).input_ids + [target.eos_id]
                                      for r in rows])
                for role, ref in (("target", "reference"), ("draft", "draft_reference"))}
    raw = greedy_acceptance([r["target_tokens"] for r in rows],
                            [raw_draft_proposer(r["draft_tokens"]) for r in rows], gamma)
    return {"rows": rows, "token_accuracy": accuracy, "raw_draft": raw.summary()}


def print_report(report: dict, show: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if show:
        table = Table("question", "target", "draft", "reference (target style)", show_lines=True)
        for row in report["rows"][:show]:
            table.add_row(row["question"], row["target"], row["draft"], row["reference"])
        console.print(table)
    acc, raw = report["token_accuracy"], report["raw_draft"]
    console.print(f"token accuracy vs references on {len(report['rows'])} held-out requests: "
                  f"target {acc['target']:.3f}, draft {acc['draft']:.3f}")
    console.print(f"raw draft accepted by the target (γ={raw['gamma']}): τ={raw['tau']:.2f}, α={raw['alpha']:.3f}")


@hydra_stage("teach")
def main(cfg: DictConfig) -> dict:
    if cfg.out:
        claim_output(cfg.out, "teach", {"world": str(Path(cfg.world).resolve()),
                                        "teach": OmegaConf.to_container(cfg.teach, resolve=True)})
        target_dir, draft_dir = teach_pair(cfg.world, cfg.out, cfg.teach, cfg.parallel)
    else:
        target_dir, draft_dir = cached_teach(world_config(cfg.world), cfg.teach, cfg.cache_root, cfg.parallel)
    print(f"taught pair: target {target_dir}, draft {draft_dir}")
    held_out = split(load_world(cfg.world, cfg.teach.durations, cfg.teach.clips))[1]
    with torch_threads(1):
        report = compare(target_dir, draft_dir, held_out[: cfg.report_clips], cfg.teach.max_new_tokens)
    print_report(report, cfg.show)
    return report
