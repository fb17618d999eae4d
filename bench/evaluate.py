"""Offline evaluation at scale: `specalign evaluate mode=offline` of N answers at γ ∈ {1, 3, 5, 7}.

    python bench/evaluate.py                  # 1,000 answers of the synthetic world, the pipeline's drafters
    python bench/evaluate.py --drafters adapter --vocab 32000 --hidden 4096 --len 50 --rows 100
                                              # the conf/adapter defaults at the 7B models' sizes

It writes a synthetic full store (random tokens and features, a temp dir) shaped like a real one: by
default the tiny pair's (V 128, H 64, layers 2/4/5) with answers of up to 40 tokens as the pipeline
extracts them. It builds each drafter type (untrained) at its config for that store, through the type's
`configure`: `--drafters pipeline` the runs the default pipeline trains (conf/pipeline/default.yaml:
token_adapter, eagle3_target), `--drafters adapter` the defaults of conf/adapter/<kind>.yaml. Then it times
`evaluate_offline` on all rows: the drafter's batched chains (`chain_runs`), the baselines (raw draft,
EventGPT as a draft model from its stored final rows and LM head) and the round walks. Untrained drafters
accept little, which changes nothing here: the batched chains cost the same passes whatever they accept.
`--reference N` also walks N answers round by round (the drafter's `propose` each round), checks that it
gives the same rounds, and extrapolates its time to all answers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from specalign.adapters.export_format import load_drafter, save_drafter
from specalign.adapters.registry import drafter_type
from specalign.data.features import PROMPT, PROMPT_TOKEN, VIDEO, context_name, feature_name
from specalign.data.store import FeatureStore, StoreWriter
from specalign.specdec.evaluate import evaluate_offline
from specalign.specdec.metrics import rounds_from_runs, simulate_greedy
from table import print_table

from specalign.paths import CONF_DIR

GAMMAS = [1, 3, 5, 7]
RUNS = {"token_adapter": "token_adapter", "eagle3": "eagle3_target"}   # kind -> the pipeline run built with --drafters pipeline


VIDEO_ROWS = 8      # as extraction pools them (one per frame)


def capture_layers(num_layers: int) -> list[int]:
    from specalign.vlms.base import eagle3_layers

    return eagle3_layers(num_layers)


def make_store(root: Path, a) -> Path:
    """a.rows answers of a.len/2..a.len tokens (draft answers as long), all in the test split (a few train
    rows for the drafters' configs); target and draft features at EAGLE-3's layers and final, bf16; the
    prompt context extraction writes (store format 2: the prompt row and VIDEO_ROWS pooled video rows of the
    target's layers, the last prompt token); both LM heads."""
    H, V, layers = a.hidden, a.vocab, capture_layers(a.layers)
    ident = {"name": "bench", "path": None, "config_hash": None, "vocab_size": V, "hidden_size": H}
    w = StoreWriter(root, {"kind": "full", "target": ident, "draft": ident,
                           "layers": {"target": layers, "draft": layers}, "dtype": "bfloat16",
                           "prompts": {}, "generation": {"max_new_tokens": a.len},
                           "context": {"features": [feature_name("target", i) for i in layers],
                                       "video_rows": VIDEO_ROWS, "video_token_id": 5, "pool": "random"}})
    g = torch.Generator().manual_seed(0)
    names = [feature_name(m, layer) for m in ("target", "draft") for layer in [*layers, None]]
    for start in range(0, a.rows + 8, 64):
        rows = []
        for i in range(start, min(start + 64, a.rows + 8)):
            n = int(torch.randint(a.len // 2, a.len + 1, (1,), generator=g))
            rows.append({"sample_id": f"s{i:05d}", "question_id": 0, "question": "q",
                         "split": "test" if i < a.rows else "train",
                         "target_tokens": torch.randint(3, V, (n,), generator=g).tolist(),
                         "draft_tokens": torch.randint(3, V, (n,), generator=g).tolist()})
        tokens = sum(len(r["target_tokens"]) for r in rows)
        tensors = {k: torch.randn(tokens, H, generator=g, dtype=torch.bfloat16) for k in names}
        for i in layers:
            tensors[context_name(PROMPT, feature_name("target", i))] = torch.randn(len(rows), H, dtype=torch.bfloat16)
            tensors[context_name(VIDEO, feature_name("target", i))] = torch.randn(len(rows) * VIDEO_ROWS, H,
                                                                                 dtype=torch.bfloat16)
        tensors[PROMPT_TOKEN] = torch.randint(3, V, (len(rows),), generator=g)
        w.write_shard(rows, tensors)
    w.save_heads({"target.lm_head": torch.randn(V, H) * 0.02, "target.embed_tokens": torch.randn(V, H) * 0.02,
                  "draft.lm_head": torch.randn(V, H) * 0.02})
    return w.finalize()


def adapter_config(kind: str, which: str, store: Path) -> dict:
    """The `adapter` config of a drafter type: the pipeline run's, or conf/adapter/<kind>.yaml's."""
    if which == "adapter":
        return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "adapter" / f"{kind}.yaml"), resolve=True)
    from hydra import compose, initialize_config_dir
    from specalign.train.pipeline import train_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        P = compose("pipeline", ["pipeline=default"]).pipeline
        return OmegaConf.to_container(train_config(P, store, store.parent / "run", RUNS[kind]).adapter, resolve=True)


def export_untrained(kind: str, which: str, store: FeatureStore, out: Path) -> Path:
    """The type's model at its config for this store, untrained, as an exported drafter."""
    t = drafter_type(kind)
    torch.manual_seed(0)
    config = t.configure(adapter_config(kind, which, store.root), store, "train")
    return save_drafter(t.build(config.to_dict()), out / kind)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def reference_walk(kind: str, drafter: Path, store: FeatureStore, n: int) -> tuple[float, int]:
    """The round-by-round walk on the first n test rows, each round drafted by `propose` from the accepted
    prefix; checked against the batched chains. -> (seconds, rows)."""
    from specalign.specdec.drafters import load_report_drafters
    from specalign.specdec.offline import drafter_runs

    d = load_report_drafters(drafter, "drafter", "offline")[0]
    rows = store.select("test")[:n]
    runs = drafter_runs(d, store, rows, max(GAMMAS))
    t0 = time.perf_counter()
    for row, (run, cap) in zip(rows, runs):
        context = d.kind.row_context(d.model, store, row, **d.options)      # what `propose` reads of the row
        for g in GAMMAS:
            r = row.target_tokens
            expected = simulate_greedy(r, lambda p, gamma, c=context, r=r: d.model.propose(c, r[:p], gamma)[0], g)
            assert rounds_from_runs(run, cap, len(r), g) == expected, (kind, row.key, g)
    return time.perf_counter() - t0, len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1000, help="answers evaluated")
    p.add_argument("--len", type=int, default=40, help="longest answer (tokens)")
    p.add_argument("--vocab", type=int, default=128, help="the target's vocabulary")
    p.add_argument("--hidden", type=int, default=64, help="both models' hidden size (EAGLE-3's width)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (where EAGLE-3's features come from)")
    p.add_argument("--drafters", choices=["pipeline", "adapter"], default="pipeline",
                   help="the default pipeline's runs, or the conf/adapter defaults")
    p.add_argument("--kinds", default="token_adapter,eagle3")
    p.add_argument("--reference", type=int, default=20, help="answers walked round by round (0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--store", default=None, help="reuse/keep the synthetic store here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.store or tempfile.mkdtemp(prefix="bench_eval_"))
    store_dir = root / "store"
    if not (store_dir / "manifest.json").exists():
        make_store(store_dir, a)
    store = FeatureStore(store_dir)
    n_tokens = sum(len(r.target_tokens) for r in store.select("test"))
    lines = [("drafter", "params", "evaluate s", "of which baselines s", "round by round s (extrapolated)")]
    _, base_s = timed(lambda: evaluate_offline(store_dir, "test", GAMMAS))
    for kind in a.kinds.split(","):
        drafter = export_untrained(kind, a.drafters, store, root / "drafters")
        params = load_drafter(drafter).num_params()
        _, s = timed(lambda d=drafter: evaluate_offline(store_dir, "test", GAMMAS, str(d)))
        ref = "–"
        if a.reference:
            ref_s, n = reference_walk(kind, drafter, store, a.reference)
            ref = f"{ref_s / n * a.rows:.0f} ({ref_s:.1f} s for {n})"
        lines.append((kind, f"{params / 1e6:.1f}M", f"{s:.1f}", f"{base_s:.1f}", ref))
    print(f"\n{a.rows} answers ({n_tokens} target tokens), V={a.vocab}, H={a.hidden}, {a.drafters} drafters, "
          f"γ ∈ {GAMMAS}, {torch.get_num_threads()} torch threads")
    print_table(lines)


if __name__ == "__main__":
    main()
