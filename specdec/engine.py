"""The fast engine: one sequence at a time on a preallocated KV cache, its forwards replayed as CUDA graphs.

`StaticDecoder(model)` wraps a transformers causal LM (Video-LLaVA, EventGPT, any LLaMA) and stands in for
the model wherever specdec.online takes one: `run_prefill` fills its cache from the prompt, `forward_tokens`
appends tokens (a decode step, a verification), `crop` drops the last ones. The cache is transformers'
`StaticCache`, allocated once for prompt + `reserve` positions and written in place; its length lives on the
device, so a forward finds where to write without waiting for the host. A crop only moves that length back:
the stale keys past it are masked (a query attends to key positions <= its own) until they are overwritten,
so cropping after a rejection is exact.

With `cuda_graphs`, a forward of W tokens (W <= max_width: a decode step is W = 1, the verification of gamma
proposals behind the pending bonus token W = gamma + 1) is captured once per (W, hidden layers) on first use
and replayed afterwards: one launch instead of the ~3,600 kernels a 7B LLaMA forward launches from Python.
The graph reads its tokens from a fixed buffer and its positions from the cache's own length, and builds its
attention mask inside. `capture` checks every graph against the eager call on the same input; a capture that
fails or disagrees is dropped with a warning and that width runs eagerly, so a graph never changes a token.
Each width is captured with each attention kernel PyTorch offers for it (its default pick, cuDNN on Hopper,
then memory-efficient and plain attention) and the fastest replay is kept: for a few queries over a long
cache the default pick is not the fastest.

Draft trees (specdec/tree.py): `forward_tree` writes [pending] + the tree's nodes at the next slots with each
node at its depth's position, and its graph (one per (width, hidden layers, "tree")) reads the tokens, the
position offsets and the [W, W] ancestor mask from fixed buffers and builds the [W, capacity] mask from the
cache's device length; `compact` then moves the accepted path's slots down behind the pending token.

With `compile` (CUDA), the elementwise chains of transformers' decoder are fused by torch.compile
(`compile_fused_ops`): each RMSNorm (7 kernels) and each layer's rotary embedding of queries and keys (10)
become one kernel. The functions are transformers' own; the matrix products stay cuBLAS's.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from specalign.specdec.tree import local_inputs
from torch import Tensor
from torch.utils._pytree import tree_leaves

from specalign.errors import SpecalignError

CACHE_ROUNDING = 128    # static cache sizes are rounded up to this many positions (fewer reallocations)


def check_graphs_device(cuda_graphs: bool, device: torch.device, key: str = "engine.cuda_graphs") -> None:
    if cuda_graphs and torch.device(device).type != "cuda":
        raise SpecalignError(f"{key}=true needs a CUDA device, the model is on {torch.device(device).type}: "
                             f"set {key}=false (CUDA graphs are a CUDA-only path)")


# ----------------------------------------------------------------------------- graph capture

class Graph:
    """A captured CUDA graph and the tensors its replay writes (they are overwritten by the next replay)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, outputs: Any):
        self.graph, self.outputs = graph, outputs

    def __call__(self) -> Any:
        self.graph.replay()
        return self.outputs


def _same(a: Any, b: Any) -> bool:
    """Eager and replayed outputs agree: integers exactly, floats to their dtype's rounding, ||x - y|| / ||y||
    (a library may pick other kernels under capture: bf16 results then differ in the last bits)."""
    for x, y in zip(tree_leaves(a), tree_leaves(b)):
        if x.is_floating_point():
            tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 2e-2
            if not bool(torch.isfinite(x).all()) or float((x.float() - y.float()).norm()) > tol * float(
                    y.float().norm()) + 1e-6:
                return False
        elif not torch.equal(x, y):
            return False
    return True


def capture(fn: Callable[[], Any], name: str, undo: Callable[[], None] = lambda: None,
            warn: bool = True) -> Graph | None:
    """`fn` (which reads and writes only tensors that outlive it) captured as one CUDA graph, or None when
    the capture fails or its replay disagrees with the eager call (with a warning unless `warn` is False:
    the caller runs eagerly). `undo` reverts the state one eager call of `fn` changes (a KV cache's length)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):            # warm-up off the capture: allocator, cuBLAS handles
            for _ in range(2):
                fn()
                undo()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn()
        eager = tree_map_clone(fn())
        undo()
        graph.replay()
        undo()
        if not _same(eager, outputs):
            if warn:
                warnings.warn(f"CUDA graph of {name} disagrees with the eager call: running it eagerly", stacklevel=3)
            return None
        return Graph(graph, outputs)
    except Exception as e:                       # noqa: BLE001 (any failure: fall back, never a wrong token)
        torch.cuda.synchronize()
        if warn:
            warnings.warn(f"CUDA graph capture of {name} failed ({type(e).__name__}: {e}); running it eagerly",
                          stacklevel=3)
        return None


def replay_seconds(graph: Graph, undo: Callable[[], None], reps: int = 10) -> float:
    """Mean seconds of one replay (after a warm-up)."""
    for i in range(reps + 3):
        if i == 3:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        graph()
        undo()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


_FUSED_MODULES: set[str] = set()


def compile_fused_ops(model) -> None:
    """torch.compile transformers' RMSNorm modules of `model` and the rotary embedding its attention applies
    (`apply_rotary_pos_emb` of the modeling module): one fused kernel each, shared by every layer (one
    compilation, dynamic shapes). The rotary function is replaced in its module, so once per process."""
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and getattr(m, "_compiled_call_impl", None) is None:
            m.compile(dynamic=True)
        module = sys.modules[type(m).__module__]
        if type(m).__name__.endswith("Attention") and hasattr(module, "apply_rotary_pos_emb") \
                and module.__name__ not in _FUSED_MODULES:
            module.apply_rotary_pos_emb = torch.compile(module.apply_rotary_pos_emb, dynamic=True)
            _FUSED_MODULES.add(module.__name__)


def attention_choices() -> list:
    """SDPA kernels to try per graph: PyTorch's own pick (None), then memory-efficient and plain attention."""
    from torch.nn.attention import SDPBackend

    return [None, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def fastest_graph(step_with: Callable[[Any], Any], name: str, undo: Callable[[], None]
                  ) -> tuple[Graph | None, str | None]:
    """`step_with(backend)` captured with each attention kernel of `attention_choices` (None: PyTorch's
    pick); -> (the graph whose replay is fastest, its kernel's name), or (None, None) when no capture holds
    (a warning for the first kernel's failure: the caller runs eagerly)."""
    best = (float("inf"), None, None)
    for i, backend in enumerate(attention_choices()):
        graph = capture(lambda b=backend: step_with(b), name, undo, warn=i == 0)
        if graph is not None:
            best = min(best, (replay_seconds(graph, undo), i, graph), key=lambda x: x[0])
    if best[2] is None:
        return None, None
    backend = attention_choices()[best[1]]
    return best[2], "default" if backend is None else backend.name.lower()


def tree_map_clone(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: tree_map_clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(tree_map_clone(v) for v in x)
    return x


# ----------------------------------------------------------------------------- the target (or EventGPT)

class StaticDecoder:
    """A causal LM decoding one sequence on a static KV cache (see the module docstring).

    reserve: positions kept beyond the prompt (new tokens + one verification, gamma + 1); max_len: a fixed
    cache size (None: prompt + reserve, rounded up, grown when a longer prompt comes); max_width: the widest
    forward replayed as a graph."""

    def __init__(self, model, reserve: int = 64, max_len: int | None = None, cuda_graphs: bool = False,
                 max_width: int = 9, compile: bool = False):
        self.model = model.eval()
        self.device = model.get_input_embeddings().weight.device
        check_graphs_device(cuda_graphs, self.device)
        check_graphs_device(compile, self.device, "engine.compile")
        self.compile = compile
        if compile:
            compile_fused_ops(model)
        self.attention: dict[tuple, str] = {}     # (width, layers) -> the SDPA kernel its graph was captured with
        self.decoder, self.head = model.get_decoder(), model.get_output_embeddings()
        self.reserve, self.max_len, self.cuda_graphs, self.max_width = reserve, max_len, cuda_graphs, max_width
        self.cache, self.capacity, self.length = None, 0, 0
        self.graphs: dict[tuple, Graph | None] = {}
        self.ids = torch.zeros(max_width, dtype=torch.long, device=self.device)   # the graphs' input tokens
        # a tree forward's inputs (module docstring of specdec/tree.py): position offsets from the cache's length
        # and the [W, W] mask of what each row sees among the rows written by the same forward
        self.offsets = torch.zeros(max_width, dtype=torch.long, device=self.device)
        self.local = torch.zeros(max_width, max_width, dtype=torch.bool, device=self.device)

    def __repr__(self) -> str:
        return (f"StaticDecoder({type(self.model).__name__}, capacity={self.capacity}, "
                f"cuda_graphs={self.cuda_graphs})")

    # ------------------------------------------------------------------ cache

    def _allocate(self, prompt_len: int) -> None:
        from transformers import StaticCache

        need = prompt_len + self.reserve
        if self.max_len is not None and need > self.max_len:
            raise SpecalignError(f"a request of {prompt_len} prompt tokens + {self.reserve} (new tokens and one "
                                 f"verification) needs {need} positions, the static KV cache holds engine.max_len="
                                 f"{self.max_len}: raise engine.max_len or lower max_new_tokens")
        if need <= self.capacity:
            return
        self.capacity = self.max_len or -(-need // CACHE_ROUNDING) * CACHE_ROUNDING
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.capacity)
        self.graphs = {}                                  # they point at the old cache's tensors
        self.positions = torch.arange(self.capacity, device=self.device)

    @torch.inference_mode()
    def crop(self, n: int) -> None:
        """Drop the last n positions (their keys stay, masked, until overwritten)."""
        if n > 0:
            self.cache.crop(-n)
            self.length -= n

    # ------------------------------------------------------------------ forwards

    @torch.inference_mode()
    def prefill(self, spec: Mapping[str, Any], hidden_layers: Sequence[int] = ()):
        """The prompt (a dict of the model's input kwargs) from an empty cache, eagerly (its shape changes with
        every prompt). -> (logits [V] float32 after the prompt, prompt length, hidden {layer: [L, H]})."""
        if callable(spec):
            raise SpecalignError("the static engine prefills from the model's input kwargs, not from a callable: "
                                 "pass a dict or use engine.kind=dynamic")
        length = int(spec["input_ids"].shape[1])
        self._allocate(length)
        self.crop(self.length)
        out = self.model(**spec, cache=self.cache, use_cache=True, output_hidden_states=bool(hidden_layers))
        self.length = length
        hidden = {i: out.hidden_states[i][0] for i in hidden_layers} if hidden_layers else None
        return out.logits[0, -1].float(), length, hidden

    @torch.inference_mode()
    def forward(self, tokens: Sequence[int], hidden_layers: Sequence[int] = ()
                ) -> tuple[Tensor, dict[int, Tensor] | None]:
        """Append `tokens` after the cached prefix. -> logits [W, V] float32, hidden {layer: [W, H]} (copies:
        they survive the next forward)."""
        width, layers = len(tokens), tuple(hidden_layers)
        if self.length + width > self.capacity:
            raise SpecalignError(f"position {self.length + width} is past the static KV cache ({self.capacity} "
                                 f"positions): raise engine.max_len or the engine's reserve (max_new_tokens + "
                                 "gamma + 1)")
        graph = self._graph(width, layers) if self.cuda_graphs and width <= self.max_width else None
        if graph is not None:
            self.ids[:width].copy_(torch.as_tensor(list(tokens), dtype=torch.long))
            logits, hidden = graph()
        else:
            ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)
            logits, hidden = self._step(ids, layers)
        self.length += width
        return logits.to(torch.float32, copy=True), ({i: h.clone() for i, h in hidden.items()} if layers else None)

    def _step(self, ids: Tensor, layers: tuple[int, ...]) -> tuple[Tensor, dict[int, Tensor]]:
        """ids [W] at the cache's length: one forward through the decoder and the LM head (graph-safe: no host
        read of a device value). -> logits [W, V] in the model's dtype, hidden {layer: [W, H]}."""
        start = self.cache.get_seq_length()                                   # device scalar
        pos = start + torch.arange(ids.shape[0], device=self.device)          # [W]
        mask = self.positions[None, :] <= pos[:, None]                        # [W, capacity]
        out = self.decoder(input_ids=ids[None], attention_mask=mask[None, None], position_ids=pos[None],
                           cache=self.cache, use_cache=True, output_hidden_states=bool(layers))
        hidden = {i: out.hidden_states[i][0] for i in layers}
        return self.head(out.last_hidden_state[0]), hidden

    def _graph(self, width: int, layers: tuple[int, ...], tree: bool = False) -> Graph | None:
        """The graph of a width (a chain's, or with `tree` a tree's: it reads its positions and mask from the
        buffers), captured with each attention kernel and kept with the fastest."""
        key = (width, layers, "tree") if tree else (width, layers)
        if key not in self.graphs:
            ids = self.ids[:width]
            step = (lambda: self._tree_step(ids, self.offsets[:width], self.local[:width, :width], layers)) if tree \
                else (lambda: self._step(ids, layers))
            self.graphs[key], kernel = fastest_graph(lambda b: self._with(b, step),
                                                     f"the {width}-token {'tree ' if tree else ''}forward",
                                                     lambda: self.cache.crop(-width))
            if self.graphs[key] is not None:
                self.attention[key] = kernel
        return self.graphs[key]

    def _with(self, backend, step: Callable[[], Any]):
        from torch.nn.attention import sdpa_kernel

        with contextlib.nullcontext() if backend is None else sdpa_kernel([backend]):
            return step()

    @torch.inference_mode()
    def warm(self, widths: Sequence[int], hidden_layers: Sequence[int] = ()) -> dict[int, bool]:
        """Capture the graphs of these widths now, after a prefill (a capture writes stale keys past the
        cached length). -> {width: captured}."""
        if not self.cuda_graphs:
            return {w: False for w in widths}
        if self.cache is None or self.length + max(widths) > self.capacity:
            raise SpecalignError("StaticDecoder.warm needs a prefilled cache with room for the widest forward")
        return {w: self._graph(w, tuple(hidden_layers)) is not None for w in widths}

    # ------------------------------------------------------------------ draft trees (specdec/tree.py)

    @torch.inference_mode()
    def forward_tree(self, pending: Sequence[int], tree, hidden_layers: Sequence[int] = ()
                     ) -> tuple[Tensor, dict[int, Tensor] | None]:
        """[pending] + the tree's nodes written at slots L .. L + W - 1 (L: cached tokens), node i at position
        L + len(pending) + depth_i - 1, attending the cache, the pending token and its own ancestors. The length
        grows by W; `compact` then keeps the accepted path. -> logits [W, V] float32, hidden {layer: [W, H]}."""
        width, layers = len(pending) + len(tree), tuple(hidden_layers)
        if self.length + width > self.capacity:
            raise SpecalignError(f"a tree of {len(tree)} nodes at position {self.length} is past the static KV cache "
                                 f"({self.capacity} positions): raise engine.max_len or the engine's reserve "
                                 "(max_new_tokens + tree.budget + 1)")
        ids, offsets, local = local_inputs(tree, pending)                       # specdec/tree.py
        if self.cuda_graphs and width <= self.max_width:
            self.ids[:width].copy_(ids)
            self.offsets[:width].copy_(offsets)
            self.local[:width, :width].copy_(local)
            graph = self._graph(width, layers, tree=True)
        else:
            graph = None
        if graph is not None:
            logits, hidden = graph()
        else:
            dev = self.device
            logits, hidden = self._tree_step(ids.to(dev), offsets.to(dev), local.to(dev), layers)
        self.length += width
        return logits.to(torch.float32, copy=True), ({i: h.clone() for i, h in hidden.items()} if layers else None)

    def _tree_step(self, ids: Tensor, offsets: Tensor, local: Tensor, layers: tuple[int, ...]):
        """ids, offsets [W], local [W, W] at the cache's length: `_step` with tree positions and a tree mask
        (graph-safe: the [W, capacity] mask is built here from the device length)."""
        start = self.cache.get_seq_length()                                   # device scalar
        rel = self.positions - start                                          # [capacity]: slot - L
        window = (rel >= 0) & (rel < ids.shape[0])                            # this forward's own slots
        # [W, capacity]: every slot before L, and of this forward's slots those `local` allows
        mask = (rel < 0)[None, :] | (window[None, :] & local.index_select(1, rel.clamp(0, ids.shape[0] - 1)))
        out = self.decoder(input_ids=ids[None], attention_mask=mask[None, None], position_ids=(start + offsets)[None],
                           cache=self.cache, use_cache=True, output_hidden_states=bool(layers))
        hidden = {i: out.hidden_states[i][0] for i in layers}
        return self.head(out.last_hidden_state[0]), hidden

    @torch.inference_mode()
    def compact(self, keep: Sequence[int]) -> None:
        """Keep only the cached slots `keep` (increasing), moved to slots 0 .. len(keep) - 1: after a tree
        verification, the prefix, the pending token and the accepted path. The unchanged head is not copied; the
        rest is read (index_select) before it is written (index_copy_), and every layer's length is set."""
        keep = list(keep)
        head = next((i for i, k in enumerate(keep) if k != i), len(keep))       # slots already in place
        if head < len(keep):
            src = torch.as_tensor(keep[head:], dtype=torch.long, device=self.device)
            dst = torch.arange(head, len(keep), device=self.device)
            for layer in self.cache.layers:
                for t in (layer.keys, layer.values):
                    t.index_copy_(2, dst, t.index_select(2, src))
        self.crop(self.length - len(keep))
