"""Extraction throughput: the batched path against a per-sample loop, measured in one run.

    python bench/extract.py --models tiny --device cpu                                  # tiny pair, 1-2 min
    python bench/extract.py --models real --device cuda --quant bf16 --batch 16,32,48 --samples 96
    python bench/extract.py --models real --device cuda --batch 48 --samples 48 --paths generate,batched,fast
    python bench/extract.py --models real --device cuda --quant nf4 --batch 16 --quantize-towers --quantize-heads

- batched:    `ExtractionModule.run` on batches of `--batch` requests: the target's batched greedy generation
              capturing its feature rows as it decodes (its prompt is computed once), then the draft's prompt
              prefilled once, its greedy generation on that KV cache and its teacher-forced pass over the
              target's responses on top of the cached prompt (`HFBackend.generate_and_teacher_force`);
- batched fast: the same, its decode steps through `vlms.batch_decode.BatchDecoder` (what `specalign
              extract` runs: a static KV cache kept per batch size, each step replayed as a CUDA graph,
              RMSNorm and rotary fused by torch.compile; on the CPU the same steps eagerly), and its inputs
              prepared on `--input-threads` host threads one batch ahead (train/extract.py InputPrefetch, as
              `specalign extract` with input_threads); its "inputs" phase is then the time the GPU loop
              waited for them, the host threads' own time is printed under the row;
- transformers generate (batched): transformers' own `generate` of each model on the same batches
              (greedy, its default growing cache, no feature rows): the reference the fast path is
              measured against ("vs generate");
- per-sample: one request at a time without that reuse: generate with the target, generate with the
              draft, then a separate teacher-forced forward (prompt + response) per model, batch size 1.

Each `--batch` size and each `--kv-cache` ("static": preallocated, written in place; "dynamic": grown by
concatenation; "offloaded": static in host memory, CUDA only) is a row of one table beside the per-sample
loop, with the batched path's time split into preparing inputs (decode, preprocess), the target and the
draft. For nf4 on CUDA the memory goal is measured on the batched path at batch 1 for each
`--memory-kv-cache`.

`--models real` builds both models at their 7B configuration (vlms/real_configs.py) with random weights,
initialised directly on the device in bf16; nf4 then replaces the LLaMA decoders' linear layers by
bitsandbytes 4-bit ones (the towers too with `--quantize-towers`; projectors and LM heads stay bf16).
Inputs are clips of the synthetic world (8 video frames, 5 event frames), prompts use the tiny pair's
word-level tokenizer, and the LM-head rows of special ids are zeroed so that no response holds a media
placeholder. `--ignore-eos` (default) makes every response `--max-new-tokens` long.

Beside each measurement: the analytic floor per sample of that path. FLOPs = 2 x params x tokens over the
prefill, the decode steps and the teacher-forced pass of each model, plus the vision towers. Per-sample:
the teacher-forced passes recompute both prompts and vision towers (per model: prefill, decode steps, then
prompt + n - 1 response tokens). Batched: the target has no teacher-forced pass (prefill and decode steps
only), the draft's adds only the n - 1 response tokens to its cached prompt; each vision tower runs once.
Bytes = per decode step the decoder and LM-head weights (shared by the batch) plus the request's KV cache.
Floor time = compute FLOPs / peak + decode steps x max(bytes / bandwidth, FLOPs / peak); defaults are an
H200's dense bf16 peak and HBM bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from specalign.data.dsec import load_dataset
from specalign.data.samples import requests_of
from specalign.data.synth import synthesize
from specalign.train.extract import ExtractionModule, Inputs, make_loader
from specalign.vlms import eventgpt_backend, video_llava
from specalign.vlms.eventgpt_backend import EventGPTBackend
from specalign.vlms.real_configs import random_pair
from specalign.vlms.video_llava import video_tokens_per_frame
from specalign.vlms.video_llava_backend import VideoLlavaBackend
from torch import nn

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights + 8-bit absmax per 64 + fp32 per 256 absmax
GOALS_GB = {False: 9.5, True: 8.4}          # both nf4 models at batch 1: towers dense / towers 4-bit
VISION = {"target": ("model.video_tower", "model.multi_modal_projector"),
          "draft": ("model.visual_tower", "model.visual_projector", "model.feature_adaptor")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", choices=("tiny", "real"), default="tiny")
    p.add_argument("--quant", choices=("bf16", "nf4", "both"), default="bf16")
    p.add_argument("--batch", type=_ints, default=[8], help="batch sizes of the batched path, e.g. 16,32,48")
    p.add_argument("--samples", type=int, default=32, help="(clip, question) requests per path")
    p.add_argument("--baseline-samples", type=int, default=16, help="requests timed on the per-sample loop")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--quantize-towers", action="store_true", help="nf4: the CLIP towers in 4-bit too")
    p.add_argument("--quantize-heads", action="store_true", help="nf4: the LM heads in 4-bit too")
    p.add_argument("--kv-cache", type=lambda s: s.split(","), default=["static"],
                   help="KV caches of the batched rows, of static,dynamic,offloaded")
    p.add_argument("--memory-kv-cache", type=lambda s: s.split(","), default=["static", "offloaded"],
                   help="nf4 on CUDA: KV caches of the memory measurement at batch 1")
    p.add_argument("--peak-flops", type=float, default=989e12, help="dense bf16 FLOP/s (H200: 989e12)")
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="memory bytes/s (H200: 4.8e12)")
    p.add_argument("--threads", type=int, default=1, help="CPU: intra-op threads (the tiny pair's matrices "
                   "are too small to share)")
    p.add_argument("--input-threads", type=int, default=4, help="batched fast: host threads preparing inputs one "
                   "batch ahead (conf/extract.yaml input_threads; 0: inline)")
    p.add_argument("--profile", action="store_true", help="CUDA: the heaviest kernels of one fast batch, and how "
                   "much of its wall time the GPU was busy")
    p.add_argument("--paths", type=lambda s: s.split(","), default=["generate", "batched", "fast"],
                   help="rows besides the per-sample loop, of generate,batched,fast")
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


# --------------------------------------------------------------------------------------------- models

def quantize_nf4(model: nn.Module, keep_dense: list[str]) -> None:
    """Replace every nn.Linear outside `keep_dense` (module paths) by a bitsandbytes nf4 Linear4bit
    (double quantised, bf16 compute), quantised on the weight's own device."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or any(name == k or name.startswith(k + ".") for k in keep_dense):
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, module=q)
        q.bias = module.bias
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to(module.weight.device))


def param_counts(model: nn.Module, role: str, decoder: nn.Module) -> dict[str, int]:
    def count(m):
        return sum(p.numel() for p in m.parameters())

    vision = [model.get_submodule(n) for n in VISION[role] if _has(model, n)]
    return {"decoder": count(decoder.layers), "head": count(model.get_output_embeddings()),
            "vision": sum(count(m) for m in vision), "total": count(model)}


def _has(model: nn.Module, name: str) -> bool:
    try:
        return model.get_submodule(name) is not None
    except AttributeError:
        return False


def build_backends(a, quant: str):
    """(target, draft) backends and their parameter counts (taken before any quantisation)."""
    target_model, draft_model, tokenizer = random_pair(a.models, a.device)
    target = VideoLlavaBackend(target_model, tokenizer, quant=quant)
    draft = EventGPTBackend(draft_model, tokenizer, quant=quant)
    counts = {b.role: param_counts(b.model, b.role, b.decoder) for b in (target, draft)}
    if quant == "nf4":
        from specalign.vlms.hf_backend import dense_modules

        quantize_nf4(target_model, dense_modules(video_llava.DENSE_MODULES, video_llava.TOWERS, a.quantize_towers,
                                                 a.quantize_heads))
        quantize_nf4(draft_model, dense_modules(eventgpt_backend.DENSE_MODULES, [eventgpt_backend.TOWER],
                                                a.quantize_towers, a.quantize_heads))
    return target, draft, counts


# ------------------------------------------------------------------------------------------- measuring

def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """CUDA: peak allocated bytes (weights included) and peak reserved by the caching allocator. CPU: peak
    resident memory above the level at entry, sampled every 2 ms."""

    def __init__(self, device: str):
        self.device, self.peak, self.reserved = device, 0, 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base, self.done = rss_bytes(), threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, rss_bytes() - self.base)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak, self.reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        else:
            self.done.set()
            self.thread.join()
            self.peak = max(self.peak, rss_bytes() - self.base)


def timed(fn, device: str) -> tuple[float, PeakMemory]:
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    return seconds, mem


def batched(module: ExtractionModule, requests, batch: int):
    def run():
        for i in range(0, len(requests), batch):
            module.run(requests[i:i + batch])
    return run


class PhaseClock:
    """Seconds spent in the backends' `prepare` (inputs), in the target's `generate` and in the draft's
    `generate_and_teacher_force`, while active (CUDA synchronised at each boundary)."""

    def __init__(self, module: ExtractionModule, device: str):
        self.module, self.sync = module, (torch.cuda.synchronize if device == "cuda" else lambda: None)
        self.seconds = {"inputs": 0.0, "target": 0.0, "draft": 0.0}
        self.host = 0.0      # `prepare` on the prefetch's host threads (overlapped with the GPU)

    def _wrap(self, backend, method: str, phase: str):
        inner = getattr(backend, method)

        def timed_call(*args, **kwargs):
            main = threading.current_thread() is threading.main_thread()
            if main:
                self.sync()
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if main:
                    self.sync()
                    self.seconds[phase] += time.perf_counter() - t0
                else:
                    self.host += time.perf_counter() - t0
        setattr(backend, method, timed_call)

    def waited(self, seconds: float) -> None:
        """The GPU loop's wait for prefetched inputs: the part of their preparation not hidden."""
        self.seconds["inputs"] += seconds

    def __enter__(self):
        target, draft = self.module.target, self.module.draft
        for backend, method, phase in ((target, "prepare", "inputs"), (draft, "prepare", "inputs"),
                                       (target, "generate", "target"), (draft, "generate_and_teacher_force", "draft")):
            self._wrap(backend, method, phase)
        return self

    def __exit__(self, *exc):
        for backend in (self.module.target, self.module.draft):
            for method in ("prepare", "generate", "generate_and_teacher_force"):
                backend.__dict__.pop(method, None)


@torch.inference_mode()
def separate_passes(module: ExtractionModule, requests) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """Extraction without reusing any prompt computation: generate with both models, then a separate
    teacher-forced forward over prompt + target response per model: the features `ExtractionModule.run`
    returns (and the responses' texts)."""
    tb, db = module.target.prepare(requests), module.draft.prepare(requests)
    target_resp = module.target.generate(tb, module.max_new_tokens, module.ignore_eos)
    draft_resp = module.draft.generate(db, module.max_new_tokens, module.ignore_eos)
    feats = {}
    for role, backend, batch in (("target", module.target, tb), ("draft", module.draft, db)):
        out = backend.teacher_forced(batch, target_resp, backend.capture_layers())
        for name, per_request in out.items():
            feats[f"{role}.{name}"] = torch.cat([t.to(torch.bfloat16).cpu() for t in per_request])
    texts = [(module.target.decode(tr), module.draft.decode(dr)) for tr, dr in zip(target_resp, draft_resp)]
    return feats, texts


def hf_generate(module: ExtractionModule, requests, batch: int):
    """transformers' own batched greedy `generate` of both models (inputs prepared as the batched path's)."""
    from transformers import GenerationConfig

    n = module.max_new_tokens

    @torch.inference_mode()
    def run():
        for i in range(0, len(requests), batch):
            for backend in (module.target, module.draft):
                inputs = backend.prepare(requests[i:i + batch]).inputs
                config = GenerationConfig(max_new_tokens=n, min_new_tokens=n if module.ignore_eos else None,
                                          do_sample=False, pad_token_id=backend.pad_id, eos_token_id=backend.eos_id)
                backend.model.generate(**inputs, generation_config=config)
    return run


def prefetched(module: ExtractionModule, requests, batch: int, threads: int, clock=None):
    """Batches as `specalign extract` runs them: the stage's loader (train/extract.py, inputs prepared on host
    threads by its InputPrefetch) fetched one batch ahead as Lightning's loop does, each batch through the
    stage's `predict_step`."""
    def run():
        loader, prefetch = make_loader(module, requests, batch, threads)
        try:
            batches = iter(loader)
            ahead = next(batches, None)
            while ahead is not None:
                current, ahead = ahead, next(batches, None)
                t0 = time.perf_counter()
                current.inputs.result()
                if clock is not None:
                    clock.waited(time.perf_counter() - t0)
                if errors := module.predict_step(current, 0)["errors"]:
                    raise SystemExit(f"a bench request failed: {errors[0]}")
        finally:
            prefetch.close()
    return run if threads > 0 else batched(module, requests, batch)


def per_sample(module: ExtractionModule, requests):
    def run():
        for r in requests:
            separate_passes(module, [r])
    return run


# --------------------------------------------------------------------------------------------- floors

@dataclass
class ModelCost:
    compute_flops: float   # per sample: prefill, teacher-forced pass, vision towers (not the decode steps)
    step_flops: float      # per sample and decode step
    weight_bytes: float    # per decode step, shared by the batch
    kv_bytes: float        # per sample and decode step (mean over the steps)


def model_cost(backend, counts: dict, requests, n_new: int, quant: str, reuse_prompt: bool) -> ModelCost:
    """`reuse_prompt`: the batched path (ExtractionModule.run): no second pass over the prompt; the target
    has no teacher-forced pass at all (its rows come from the decode steps), the draft's covers the n - 1
    forced response tokens only. Otherwise (per-sample loop) the teacher-forced pass recomputes the prompt
    and the vision tower: prompt + n - 1 tokens."""
    text = backend.text_config
    prompt = sum(backend.prepare([r]).prompt_lens[0] for r in requests[:4]) / min(4, len(requests))
    flops_per_token = 2 * counts["decoder"]
    vision_tokens = _vision_tokens(backend, requests[0])
    if not reuse_prompt:
        forced_tokens, vision_passes = prompt + n_new - 1, 2
    else:
        forced_tokens, vision_passes = (0 if backend.role == "target" else n_new - 1), 1
    compute = (flops_per_token * (prompt + forced_tokens) + 2 * counts["head"]
               + vision_passes * 2 * counts["vision"] * vision_tokens)
    weight = NF4_BYTES if quant == "nf4" else 2
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * 2
    return ModelCost(compute_flops=compute, step_flops=flops_per_token + 2 * counts["head"],
                     weight_bytes=weight * counts["decoder"] + 2 * counts["head"],
                     kv_bytes=kv_per_token * (prompt + n_new / 2))


def _vision_tokens(backend, request) -> int:
    """Tokens through the vision tower (and projector) per request."""
    config = backend.model.config
    if backend.role == "target":
        return backend.num_frames * video_tokens_per_frame(config)
    vision = config.vision_config
    return len(request.sample.event_images) * ((vision.image_size // vision.patch_size) ** 2 + 1)


def floor(costs: list[ModelCost], n_new: int, batch: int, a) -> dict[str, float]:
    """Per sample: FLOPs, bytes and the implied lower-bound seconds at `batch`."""
    steps = n_new - 1
    flops = sum(c.compute_flops + steps * c.step_flops for c in costs)
    step_bytes = sum(c.weight_bytes / batch + c.kv_bytes for c in costs)
    step_time = max(step_bytes / a.bandwidth, sum(c.step_flops for c in costs) / a.peak_flops)
    seconds = sum(c.compute_flops for c in costs) / a.peak_flops + steps * step_time
    return {"flops": flops, "bytes": steps * step_bytes, "seconds": seconds}


# ---------------------------------------------------------------------------------------------- report

def set_kv_cache(module: ExtractionModule, kv_cache: str) -> None:
    module.target.kv_cache = module.draft.kv_cache = kv_cache


def bench_quant(a, quant: str, requests) -> list[dict]:
    target, draft, counts = build_backends(a, quant)
    module = ExtractionModule(target, draft, a.max_new_tokens, a.ignore_eos)
    if a.device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    loaded = torch.cuda.memory_allocated() if a.device == "cuda" else None
    describe(target, draft, counts, loaded, quant)
    separate_passes(module, requests[:1])  # warm-up: kernels, allocator, caches
    costs = {path: [model_cost(b, counts[b.role], requests, a.max_new_tokens, quant, reuse_prompt=path == "batched")
                    for b in (target, draft)] for path in ("per-sample", "batched")}
    set_kv_cache(module, "dynamic")  # as transformers' own generate
    baseline = requests[: a.baseline_samples]
    seconds, mem = timed(per_sample(module, baseline), a.device)
    rows = [{"quant": quant, "path": "per-sample", "kv": "dynamic", "batch": 1, "rate": len(baseline) / seconds,
             "peak": mem.peak, "reserved": mem.reserved, "phases": None,
             **floor(costs["per-sample"], a.max_new_tokens, 1, a)}]
    print(f"  measured {quant} per-sample: {rows[0]['rate']:.2f} samples/s", flush=True)
    if "generate" in a.paths:  # before the fast path: its torch.compile replaces transformers' rotary function
        for batch in a.batch:
            hf_generate(module, requests[:batch], batch)()  # warm-up at this shape
            seconds, mem = timed(hf_generate(module, requests, batch), a.device)
            rows.append({"quant": quant, "path": "transformers generate", "kv": "dynamic", "batch": batch,
                         "rate": len(requests) / seconds, "peak": mem.peak, "reserved": mem.reserved,
                         "phases": None, **floor(costs["batched"], a.max_new_tokens, batch, a)})
            print(f"  measured {quant} transformers generate batch {batch}: {rows[-1]['rate']:.2f} samples/s",
                  flush=True)
    for kv_cache in a.kv_cache if "batched" in a.paths else ():
        set_kv_cache(module, kv_cache)
        for batch in a.batch:
            rows.append(bench_batched(a, module, quant, requests, batch, "batched", kv_cache, costs["batched"]))
    if "fast" in a.paths:
        set_kv_cache(module, "static")
        t0 = time.perf_counter()
        module.use_fast_decode()
        for batch in a.batch:
            rows.append(bench_batched(a, module, quant, requests, batch, "batched fast", "static", costs["batched"],
                                      a.input_threads))
        print(f"  fast path: attention kernels of the graphs {describe_graphs(module)}; set-up and runs "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        if a.profile and a.device == "cuda":
            profile_batch(module, requests[: a.batch[-1]])
        module.target.batch_decoder = module.draft.batch_decoder = None
    if quant == "nf4" and a.device == "cuda":
        memory_at_batch_1(a, module, requests, loaded)
    del module, target, draft
    return rows


def bench_batched(a, module: ExtractionModule, quant: str, requests, batch: int, path: str, kv_cache: str,
                  costs: list[ModelCost], input_threads: int = 0) -> dict:
    """One row of `ExtractionModule.run` on batches of `batch` (after a warm-up batch of that shape), inputs
    prepared one batch ahead on `input_threads` host threads (0: inline)."""
    module.run(requests[:batch])
    with PhaseClock(module, a.device) as clock:
        seconds, mem = timed(prefetched(module, requests, batch, input_threads, clock), a.device)
    row = {"quant": quant, "path": path, "kv": kv_cache, "batch": batch, "rate": len(requests) / seconds,
           "peak": mem.peak, "reserved": mem.reserved, "phases": {k: v / len(requests) for k, v in clock.seconds.items()},
           **floor(costs, a.max_new_tokens, batch, a)}
    print(f"  measured {quant} {path} kv_cache {kv_cache} batch {batch}: {row['rate']:.2f} samples/s, "
          f"peak {mem.peak / 1e9:.2f} GB" + (f"; inputs on {input_threads} host threads one batch ahead: "
                                             f"{1e3 * clock.host / len(requests):.0f} ms/sample there, "
                                             f"{1e3 * clock.seconds['inputs'] / len(requests):.0f} waited for"
                                             if input_threads > 0 else ""), flush=True)
    return row


def profile_batch(module: ExtractionModule, requests) -> None:
    """The CUDA kernels of one fast batch (inputs prepared before), grouped by name, and the GPU's busy share
    of the batch's wall time (the rest: host work the GPU waited for)."""
    from torch.profiler import ProfilerActivity, profile

    tb, db = module.target.prepare(requests), module.draft.prepare(requests)
    inputs = Inputs({}, tb, db)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        module.run(requests, inputs)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
    print(f"\nOne fast batch of {len(requests)}: {wall * 1e3:.0f} ms wall, CUDA kernels {busy * 1e3:.0f} ms "
          f"({100 * busy / wall:.0f} % busy); the heaviest kernels:")
    print(events.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70))


def describe_graphs(module: ExtractionModule) -> str:
    graphs = {b.role: getattr(b.batch_decoder, "attention", {}) for b in (module.target, module.draft)}
    return "; ".join(f"{role} " + (", ".join(f"batch {k[0]}: {v}" for k, v in g.items()) or "none")
                     for role, g in graphs.items())


def memory_at_batch_1(a, module: ExtractionModule, requests, loaded: int) -> None:
    """The nf4 memory goal: peak GPU memory of the batched path run one request at a time, per KV cache."""
    towers = "4-bit" if a.quantize_towers else "bf16"
    heads = "4-bit" if a.quantize_heads else "bf16"
    print(f"nf4, both models, towers {towers}, LM heads {heads}: loaded {loaded / 1e9:.2f} GB "
          f"(goal <= {GOALS_GB[a.quantize_towers]} GB at batch 1)")
    for kv_cache in a.memory_kv_cache:
        set_kv_cache(module, kv_cache)
        gc.collect()
        torch.cuda.empty_cache()
        seconds, mem = timed(batched(module, requests[:2], 1), a.device)
        print(f"  batch 1, kv_cache {kv_cache}: peak {mem.peak / 1e9:.2f} GB allocated, {mem.reserved / 1e9:.2f} GB "
              f"reserved, {2 / seconds:.2f} samples/s")


def describe(target, draft, counts, loaded, quant) -> None:
    for b in (target, draft):
        c = counts[b.role]
        print(f"{b.role} {b.name} ({quant}): {_millions(c['total'])} params (decoder layers "
              f"{_millions(c['decoder'])}, LM head {_millions(c['head'])}, vision {_millions(c['vision'])})")
    if loaded is not None:
        print(f"both models loaded: {loaded / 1e9:.2f} GB allocated")


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.3f} B"


def print_table(rows: list[dict], a) -> None:
    mem = "peak GB (alloc)" if a.device == "cuda" else "peak RSS rise MB"
    scale = 1e9 if a.device == "cuda" else 1e6
    head = ["quant", "path", "kv cache", "batch", "samples/s", "ms/sample", "inputs/target/draft ms", mem,
            "speedup", "vs generate", "GFLOP/sample", "GB read/sample", "floor ms/sample", "floor samples/s",
            "% of floor"]
    lines = [head]
    for r in rows:
        base = next(x for x in rows if x["quant"] == r["quant"] and x["path"] == "per-sample")
        hf = next((x for x in rows if x["quant"] == r["quant"] and x["path"] == "transformers generate"
                   and x["batch"] == r["batch"]), None)
        phases = "/".join(f"{1e3 * v:.0f}" for v in r["phases"].values()) if r["phases"] else "-"
        vs = f"{r['rate'] / hf['rate']:.2f}x" if hf and r["batch"] > 1 else "-"
        lines.append([r["quant"], r["path"], r["kv"], str(r["batch"]), f"{r['rate']:.2f}", f"{1e3 / r['rate']:.1f}",
                      phases, f"{r['peak'] / scale:.2f}", f"{r['rate'] / base['rate']:.1f}x", vs,
                      f"{r['flops'] / 1e9:.1f}",
                      f"{r['bytes'] / 1e9:.2f}", f"{r['seconds'] * 1e3:.3g}", f"{1 / r['seconds']:.3g}",
                      f"{100 * r['seconds'] * r['rate']:.2g}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for k, line in enumerate(lines):
        print("| " + " | ".join(cell.rjust(w) for cell, w in zip(line, widths)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(f"floor at {a.peak_flops / 1e12:.0f} TFLOP/s and {a.bandwidth / 1e12:.1f} TB/s; FLOPs count 2 x params "
          "x tokens (attention scores excluded); bytes = decode-step weights / batch + KV cache reads")


def make_requests(n: int, root: Path):
    clips = math.ceil(n / 6)  # the synthetic world asks 6 questions per clip
    dataset = synthesize(root, clips=clips, seed=0, durations=("1s",))["1s"]
    samples, _ = load_dataset(dataset)
    return requests_of(samples)[:n]


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    quants = ("bf16", "nf4") if a.quant == "both" else (a.quant,)
    with tempfile.TemporaryDirectory() as tmp:
        requests = make_requests(a.samples, Path(tmp))
        print(f"models {a.models} on {a.device}: {len(requests)} requests, batches {a.batch}, "
              f"{a.max_new_tokens} new tokens, ignore_eos {a.ignore_eos}")
        rows = []
        for quant in quants:
            rows += bench_quant(a, quant, requests)
            gc.collect()
            if a.device == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, a)


if __name__ == "__main__":
    main()
