"""Training throughput of the drafters: tokens/s, MFU, and the store loader's own rate.

    python bench/train.py                                   # CPU, small sizes
    python bench/train.py --device cuda --hidden 4096 --vocab 32000 --draft-vocab 32000 \\
        --batch 8 --seq 512 --rows 128 --workers 0,15

It writes a synthetic full store of the requested size (a temp dir), then measures
- step:   one training step as Lightning runs it (module.losses, backward, AdamW), bf16 autocast
          on CUDA, batches already on the device;
- loader: the DataModule's train loader alone (the host side: read, concatenate, pad, pin), for each
          `--workers` setting (0: the training process's prefetch thread; N: N worker processes);
- fed:    the same step copying its batches to the device itself (as Lightning does), relative to the
          step above: "copied" from a few pinned host batches held in memory (the cost of the copy
          alone), "w=N" from each live loader (equal to "copied" when the loader keeps up).
- val tau: the validation acceptance of one batch (`DrafterModule.simulate`: the drafter's greedy chains
          at every position in batched forwards, then the round walk), and its share of an epoch,
          (val rows / batch x its time) / (train rows / batch x the step time), with --train-rows and
          --val-rows (default: 872 train answers, the 64 rows of val.max_rows).
MFU = matmul FLOPs by formula (forward 2x, backward 4x for what is trained) / step time / peak;
the peak defaults to H100/H200 dense bf16 (989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import itertools
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from specalign.adapters.eagle3 import Eagle3Config, Eagle3Module
from specalign.adapters.token_adapter import TokenAdapterConfig, TokenAdapterModule
from specalign.data.store import FeatureStore, StoreWriter
from specalign.specdec.metrics import Acceptance
from specalign.train.datamodule import FeatureDataModule, TokenPairDataModule
from table import print_table

LAYERS = [2, 16, 29]
OPTIM = {"_target_": "torch.optim.AdamW", "lr": 1e-4}
SCHED = {"_target_": "specalign.train.modules.warmup_schedule", "kind": "constant"}


def make_store(root: Path, a) -> Path:
    """a.rows responses of a.seq tokens; target features h{2,16,29} and final, bf16."""
    H, V = a.hidden, a.vocab
    ident = {"name": "bench", "path": None, "config_hash": None, "vocab_size": V, "hidden_size": H}
    w = StoreWriter(root, {"kind": "full", "target": ident, "draft": ident,
                           "layers": {"target": LAYERS, "draft": LAYERS}, "dtype": "bfloat16",
                           "prompts": {}, "generation": {}})
    g = torch.Generator().manual_seed(0)
    for start in range(0, a.rows, 8):
        rows = [{"sample_id": f"s{i:05d}", "question_id": 0, "question": "q",
                 "split": "train" if i else "val",
                 "target_tokens": torch.randint(3, V, (a.seq,), generator=g).tolist(),
                 "draft_tokens": torch.randint(3, V, (a.seq,), generator=g).tolist()}
                for i in range(start, min(start + 8, a.rows))]
        n = a.seq * len(rows)
        names = [f"target.h{i}" for i in LAYERS] + ["target.final"]
        w.write_shard(rows, {k: torch.randn(n, H, generator=g, dtype=torch.bfloat16) for k in names})
    w.save_heads({"target.lm_head": torch.randn(V, H, dtype=torch.bfloat16) * 0.02,
                  "target.embed_tokens": torch.randn(V, H, dtype=torch.bfloat16) * 0.02,
                  "draft.lm_head": torch.zeros(1, H, dtype=torch.bfloat16)})
    return w.finalize()


def eagle3_flops_per_token(c: Eagle3Config, T: int) -> float:
    """Training FLOPs per response token: fc (forward + weight grad), the frozen teacher head
    (forward), and per TTT step k the layer and head (forward + backward) with attention over
    (T + 1) / 2 real rows plus k own steps."""
    H, F, I, N = c.hidden_size, c.fc_in_features, c.intermediate_size, c.draft_vocab_size
    kv = c.num_key_value_heads * H // c.num_attention_heads
    per_step = 2 * (2 * H * (H + 2 * kv) + H * H + 3 * H * I + H * N)      # q/k/v, o, MLP, head
    flops = 4 * F * H + 2 * H * N
    for k in range(c.ttt_steps):
        flops += 3 * (per_step + 4 * H * ((T + 1) / 2 + k))
    return flops


def token_adapter_flops_per_token(c: TokenAdapterConfig, T: int) -> float:
    """Training FLOPs per target token, with an equally long draft segment: both segments
    through every layer, causal self-attention, cross-attention, head and pointer."""
    d, f, V = c.d_model, c.d_ff, c.vocab_size
    layer = 2 * (4 * d * d + 2 * d * f) + 4 * d * (T + 1) / 2
    cross = 4 * d * T if c.condition_on_draft else 0
    streams = 2 if c.condition_on_draft else 1
    fwd = c.n_layer * (streams * layer + cross) + 2 * d * V + (4 * d * d + 2 * d * T if c.copy else 0)
    return 3 * fwd


def loader_rate(dm, seconds: float = 3.0) -> float:
    """Response tokens per second the train loader delivers (host side only), in steady state:
    one pass first starts the (persistent) workers and warms the page cache, as in training."""
    loader = dm.train_dataloader()
    for _ in loader:
        pass
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in loader:
            tokens += length(b)
    return tokens / (time.perf_counter() - t0)


def loader_rates(make_dm, workers: list[int]) -> dict[int, float]:
    return {w: loader_rate(make_dm(w)) for w in workers}


def steps_rate(module, batches: Iterator[dict], device: str, warmup: int, steps: int) -> float:
    """Response tokens per second of the training step as Lightning runs it, taking its batches from
    `batches` and moving them to the device (nothing to move for batches already there)."""
    module.to(device).train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    tokens, t0 = 0, 0.0
    for i, batch in zip(range(warmup + steps), batches):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        if i >= warmup:
            tokens += length(batch)
        train_step(module, opt, params, to_device(batch, device), device)
    sync()
    return tokens / (time.perf_counter() - t0)


def endless(dm) -> Iterator[dict]:
    """One train loader, epoch after epoch (as Lightning iterates it: its store stays open and its
    worker processes, if any, live on)."""
    loader = dm.train_dataloader()
    while True:
        yield from loader


def repeated(host_batches: list[dict]) -> Iterator[dict]:
    """The same few host batches (pinned when a GPU is present) again and again: no loader at all."""
    pinned = [{k: v.pin_memory() if torch.cuda.is_available() else v for k, v in b.items()} for b in host_batches]
    while True:
        yield from pinned


def length(batch: dict) -> int:
    return int((batch["length"] if "length" in batch else batch["target_len"]).sum())


def train_step(module, opt, params, batch: dict, device: str) -> None:
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = module.losses(batch, train=True)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def bench_eagle3(store: Path, a) -> dict:
    H = a.hidden
    heads = a.heads or max(1, H // 128)
    c = Eagle3Config(hidden_size=H, intermediate_size=a.intermediate or 11008 * H // 4096,
                     num_attention_heads=heads, num_key_value_heads=heads, vocab_size=a.vocab,
                     draft_vocab_size=min(a.draft_vocab, a.vocab),
                     feature_names=[f"target.h{i}" for i in LAYERS], fc_in_features=3 * H,
                     aux_layer_ids=LAYERS, ttt_steps=a.ttt)

    def data(workers):
        return FeatureDataModule(str(store), c.feature_names, batch_size=a.batch, num_workers=workers, max_len=a.seq)

    module = Eagle3Module(model=c.to_dict(), optimizer=OPTIM, scheduler=SCHED)
    module.init_from_store(FeatureStore(store), "train")
    return measure(module, data, a, f"eagle3 H={H} N={c.draft_vocab_size} ttt={c.ttt_steps}",
                   eagle3_flops_per_token(c, a.seq))


def bench_token_adapter(store: Path, a) -> dict:
    c = TokenAdapterConfig(vocab_size=a.vocab, max_len=a.seq)

    def data(workers):
        return TokenPairDataModule(str(store), batch_size=a.batch, num_workers=workers, max_len=a.seq)

    module = TokenAdapterModule(model=c.to_dict(), optimizer=OPTIM, scheduler=SCHED)
    return measure(module, data, a, f"token_adapter d={c.d_model} V={c.vocab_size}",
                   token_adapter_flops_per_token(c, a.seq))


def val_tau_seconds(module, batches: list[dict], device: str, gamma: int, repeat: int = 3) -> float:
    """Seconds of validation acceptance per batch (as validation runs it: eval mode, no autograd)."""
    module.to(device).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    module._acceptance = Acceptance(gamma)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        module.simulate(batches[0])                                               # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(repeat):
            for b in batches:
                module.simulate(b)
        sync()
    module.train()
    return (time.perf_counter() - t0) / (repeat * len(batches))


def measure(module, data, a, name: str, flops_per_token: float) -> dict:
    """The step on batches already on the device; each loader setting alone; then the step copying its
    batches to the device: from pinned host batches held in memory (no loader), and from each loader."""
    host = [b for _, b in zip(range(4), data(a.workers[0]).train_dataloader())]
    staged = [to_device(b, a.device) for b in host]
    rate = steps_rate(module, itertools.cycle(staged), a.device, a.warmup, a.steps)
    tokens = sum(map(length, staged)) / len(staged)                               # per step
    dt = tokens / rate
    fed = {"copied": steps_rate(module, repeated(host), a.device, a.fed_warmup, a.fed_steps)}
    for w in a.workers:
        batches = endless(data(w))
        fed[f"w={w}"] = steps_rate(module, batches, a.device, a.fed_warmup, a.fed_steps)
        batches.close()
    val_s = val_tau_seconds(module, staged, a.device, a.val_gamma)
    epoch = {"train": math.ceil(a.train_rows / a.batch) * dt, "val": math.ceil(a.val_rows / a.batch) * val_s}
    return {"model": name, "params": module.model.num_params(), "dt": dt, "tokens": tokens,
            "flops": flops_per_token * tokens, "loaders": loader_rates(data, a.workers), "fed": fed,
            "val_s": val_s, "val_share": epoch["val"] / epoch["train"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=None, help="default 11008 * hidden / 4096")
    p.add_argument("--heads", type=int, default=None, help="default hidden / 128 (at least 1)")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--draft-vocab", type=int, default=256)
    p.add_argument("--ttt", type=int, default=7)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--workers", type=lambda t: [int(x) for x in t.split(",")], default=[0, 2],
                   help="loader settings to measure, e.g. 0,15 (0: prefetch thread; N: worker processes)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--fed-warmup", type=int, default=10, help="fed steps before timing (the pinned host "
                   "allocator fills its cache of batch buffers)")
    p.add_argument("--fed-steps", type=int, default=20)
    p.add_argument("--peak", type=float, default=989e12, help="peak FLOP/s (H100/H200 dense bf16)")
    p.add_argument("--adapter", choices=["eagle3", "token_adapter", "both"], default="both")
    p.add_argument("--val-gamma", type=int, default=5, help="val.gamma of conf/train.yaml")
    p.add_argument("--train-rows", type=int, default=872, help="train answers per epoch (for the val tau share)")
    p.add_argument("--val-rows", type=int, default=64, help="val rows simulated per epoch (val.max_rows)")
    p.add_argument("--store", default=None, help="reuse/keep the synthetic store here")
    a = p.parse_args()
    root = Path(a.store or tempfile.mkdtemp(prefix="bench_store_"))
    store = root if (root / "manifest.json").exists() else make_store(root, a)
    results = []
    if a.adapter in ("eagle3", "both"):
        results.append(bench_eagle3(store, a))
    if a.adapter in ("token_adapter", "both"):
        results.append(bench_token_adapter(store, a))
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"\ndevice {name}, batch {a.batch} x seq {a.seq}, peak {a.peak / 1e12:.0f} TFLOP/s")
    loaders = [f"loader w={w}" for w in a.workers]
    head = ["model", "params", "step ms", "tokens/s", "TFLOP/s", "MFU", *[f"{x} tok/s" for x in loaders],
            *[f"{x}/step" for x in loaders], *[f"step fed {k}" for k in results[0]["fed"]],
            "val tau ms/batch", "val tau / epoch"]
    lines = [head]
    for r in results:
        rate = r["tokens"] / r["dt"]
        flops = r["flops"] / r["dt"]
        lines.append([r["model"], f"{r['params'] / 1e6:.1f}M", f"{r['dt'] * 1e3:.1f}", f"{rate:.0f}",
                      f"{flops / 1e12:.2f}", f"{flops / a.peak:.1%}",
                      *[f"{v:.0f}" for v in r["loaders"].values()], *[f"{v / rate:.1f}x" for v in r["loaders"].values()],
                      *[f"{v / rate:.2f}" for v in r["fed"].values()], f"{r['val_s'] * 1e3:.1f}",
                      f"{r['val_share']:.1%}"])
    print_table(lines)


if __name__ == "__main__":
    main()
