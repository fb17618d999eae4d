"""Lightning DataModules over a feature store (read memory-mapped, row by row).

- TokenPairDataModule: draft and target tokens; works on tokens-only and full stores.
- FeatureDataModule: target tokens, the fused EAGLE-3 source features and `target.final`
  (the teacher's logits are recomputed from it); needs a full store.

`train_split` feeds training and `val_split` validation; the test split is refused for both.
With `num_workers=0` (the default) training batches are assembled `prefetch` batches ahead by a
background thread of the training process (`Prefetcher`), straight into pinned memory when a GPU is
present: row slices of the memory-mapped shards are copied once, into buffers the allocator reuses.
Worker processes (`num_workers>0`) hand each batch over through fresh shared memory instead, which
costs more than the copy itself for feature rows.
Training batches come from ResumableBatchSampler: their order is a function of (seed, epoch)
only and a resumed run starts at the batch it stopped at, so a killed-then-resumed run sees the
same data as an uninterrupted one. That position travels in the checkpoint as the DataModule's own
state: Lightning restores it before anything builds the training loader (the scheduler's horizon,
`estimated_stepping_batches`, builds it before the loops' state is restored).
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import lightning as L
import numpy as np
import torch
from specalign.data.store import FeatureStore, Row
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from specalign.errors import DataError, SpecalignError

PAD_ID = 0


def check_splits(train_split: str, val_split: str) -> None:
    if "test" in (train_split, val_split) or "all" in (train_split, val_split):
        raise SpecalignError(f"training uses train/val splits only (got train={train_split!r}, "
                             f"val={val_split!r}); the test split is for `specalign evaluate`")


def pad(seqs: list[torch.Tensor], value=0) -> torch.Tensor:
    """Right-pad 1-D or 2-D tensors along dim 0 -> [B, T_max, ...]."""
    T = max((len(s) for s in seqs), default=0)
    out = seqs[0].new_full((len(seqs), max(T, 1), *seqs[0].shape[1:]), value)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffled batches; global batch g lives in epoch g // len(self), shuffled by seed + epoch.

    Iteration starts at global batch `start` and runs to the end of that epoch; the next
    iteration starts the following epoch. Given `position` (-> the global batch to start at), each
    iteration asks it instead: Lightning may start an iteration and drop it (workers and the prefetch
    thread take batches ahead), so only the training loop knows where the next one begins. Under DDP
    each rank takes its own slice of every epoch's permutation (equal lengths on every rank)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1,
                 position: Callable[[], int] | None = None):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_rank = n // world
        self.next, self.position = start, position

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.position is not None:
            self.next = self.position()
        epoch, offset = divmod(self.next, len(self))
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        mine = perm[self.rank:: self.world][: self.per_rank]
        for batch in mine.split(self.batch_size)[offset:]:
            self.next += 1
            yield batch.tolist()


class Prefetcher:
    """Iterates `loader` in a background thread, up to `depth` batches ahead of the consumer. The copies
    that build a batch release the GIL, so they overlap the training step. Errors are raised in the
    consumer; leaving the loop early stops the thread."""

    def __init__(self, loader: Iterable, depth: int = 2):
        self.loader, self.depth = loader, depth

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        done = object()
        slots: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    slots.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for batch in self.loader:
                    if not put(batch):
                        return
                put(done)
            except BaseException as e:  # noqa: BLE001 -- handed to the consumer
                put(e)

        thread = threading.Thread(target=produce, name="specalign-prefetch", daemon=True)
        thread.start()
        try:
            while (item := slots.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


class _StoreDataModule(L.LightningDataModule):
    def __init__(self, store: str, batch_size: int = 16, num_workers: int = 0, train_split: str = "train",
                 val_split: str = "val", seed: int = 0, prefetch: int = 2):
        super().__init__()
        check_splits(train_split, val_split)
        self.root, self.batch_size, self.num_workers, self.seed = store, batch_size, num_workers, seed
        self.prefetch = prefetch
        self.train_split, self.val_split = train_split, val_split
        self.store = FeatureStore(store)
        self.train_rows, self.val_rows = self.store.select(train_split), self.store.select(val_split)
        for split, rows in ((train_split, self.train_rows), (val_split, self.val_rows)):
            if not rows:
                raise DataError(self.root, f"the store has no rows in the {split!r} split")
        self.resume_at: int | None = None    # global training batch a resumed run starts at

    def taken(self) -> int:
        """Training batches the loop has taken so far, over all epochs (a resumed run's included)."""
        return self.trainer.fit_loop.epoch_loop.total_batch_idx + 1

    def position(self) -> int:
        """Global index of the next training batch. Lightning builds and first iterates the training loader
        before it restores the loop's counters; until then they read 0, and the checkpoint's position
        (restored earlier, with the DataModule) holds."""
        return max(self.taken(), self.resume_at or 0)

    def state_dict(self) -> dict:
        return {"train_batches": self.taken()}

    def load_state_dict(self, state: dict) -> None:
        self.resume_at = int(state["train_batches"])

    def dataset(self, rows: list[Row]) -> Dataset:
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict:
        raise NotImplementedError

    def _loader(self, rows, **kw) -> DataLoader:
        # pinning a tensor collate already built in pinned memory returns it as it is: no second copy
        return DataLoader(self.dataset(rows), collate_fn=self.collate, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(), **kw)

    def train_dataloader(self) -> DataLoader | Prefetcher:
        t = self.trainer
        if t is not None and t.ckpt_path and self.resume_at is None:
            raise DataError(t.ckpt_path, "holds no training data position (written by an older version)",
                            "start a new run; this one cannot be resumed exactly")
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        sampler = ResumableBatchSampler(len(self.train_rows), self.batch_size, self.seed, 0, rank, world,
                                        position=self.position if t is not None else None)
        loader = self._loader(self.train_rows, batch_sampler=sampler)
        return Prefetcher(loader, self.prefetch) if self.num_workers == 0 and self.prefetch > 0 else loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_rows, batch_size=self.batch_size, shuffle=False)


class TokenPairs(Dataset):
    def __init__(self, rows: list[Row], max_len: int):
        self.items = [(r.draft_tokens[:max_len], r.target_tokens[:max_len]) for r in rows]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        draft, target = self.items[i]
        return {"draft": torch.tensor(draft, dtype=torch.long),
                "target": torch.tensor(target, dtype=torch.long), "index": i}


def collate_tokens(items: list[dict]) -> dict:
    """-> draft [B, m], draft_len [B], target [B, n], target_len [B] (right padded with PAD_ID), and
    index [B] when the items have one (`row_index`)."""
    return {"draft": pad([it["draft"] for it in items], PAD_ID),
            "draft_len": torch.tensor([len(it["draft"]) for it in items]),
            "target": pad([it["target"] for it in items], PAD_ID),
            "target_len": torch.tensor([len(it["target"]) for it in items]), **row_index(items)}


def row_index(items: list[dict]) -> dict:
    """{"index": [B]}: the items' places in their split, which training errors name the rows by (the
    items of the training datasets have one; batches built for evaluation need none)."""
    return {"index": pinned(torch.tensor([it["index"] for it in items]))} if "index" in items[0] else {}


class TokenPairDataModule(_StoreDataModule):
    def __init__(self, store: str, max_len: int = 1024, **kw):
        super().__init__(store, **kw)
        self.max_len = max_len

    def dataset(self, rows):
        return TokenPairs(rows, self.max_len)

    def collate(self, items):
        return collate_tokens(items)


class FeatureRows(Dataset):
    """One item per row: tokens [n], feats [n, fc_in] (names concatenated), final [n, H] (bf16).

    The store is opened lazily in each worker process (its file handles do not pickle)."""

    def __init__(self, root: str, rows: list[Row], feature_names: list[str], max_len: int,
                 context: Callable[[FeatureStore, Row], dict] | None = None):
        self.root, self.rows, self.names, self.max_len = root, rows, list(feature_names), max_len
        self.context = context     # (store, row) -> the row's prompt context (adapters/eagle3.py context_inputs)
        self._store: FeatureStore | None = None

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = FeatureStore(self.root)
        return self._store

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        """Row slices as read from the memory-mapped shards; fused and padded in one copy by
        `collate_features`."""
        row, n = self.rows[i], min(len(self.rows[i].target_tokens), self.max_len)
        return {"tokens": torch.tensor(row.target_tokens[:n], dtype=torch.long),
                "parts": [self.store.hidden(row, name)[:n] for name in self.names],
                "final": self.store.hidden(row, "target.final")[:n], "index": i,
                **(self.context(self.store, row) if self.context else {})}


def batch_buffer(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised batch tensor. In a loader worker it is allocated in shared memory (as torch's
    default_collate does), so handing it to the main process copies nothing; in the main process it is
    pinned when a GPU is present (the host-to-device copy can then run asynchronously, and the pinned
    allocator reuses its blocks, so no page is touched for the first time in steady state)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=like.dtype, pin_memory=torch.cuda.is_available())
    storage = like._typed_storage()._new_shared(math.prod(shape), device=like.device)
    return like.new(storage).view(shape)


def collate_features(items: list[dict]) -> dict:
    """-> tokens [B, T], length [B], feats [B, T, fc_in] (the parts side by side, `fuse_features`
    order), final [B, T, H]; zero padded, each row copied once into the batch; index [B] (`row_index`)."""
    B, T = len(items), max(len(it["tokens"]) for it in items)
    widths = [p.shape[-1] for p in items[0]["parts"]]
    first = items[0]["final"]
    feats = batch_buffer(first, (B, T, sum(widths)))
    final = batch_buffer(first, (B, T, first.shape[-1]))
    for b, it in enumerate(items):
        n, col = len(it["tokens"]), 0
        for part, w in zip(it["parts"], widths):
            copy_rows(feats[b, :n, col: col + w], part)
            col += w
        copy_rows(final[b, :n], it["final"])
        feats[b, n:] = 0
        final[b, n:] = 0
    return {"tokens": pinned(pad([it["tokens"] for it in items], PAD_ID)),
            "length": pinned(torch.tensor([len(it["tokens"]) for it in items])), "feats": feats, "final": final,
            **row_index(items), **collate_context(items)}


def collate_context(items: list[dict]) -> dict:
    """The items' prompt context, when they carry one: prompt [B, fc_in], prompt_token [B], video [B, K, fc_in]."""
    if "video" not in items[0]:
        return {}
    return {"prompt": pinned(torch.stack([it["prompt"] for it in items])),
            "prompt_token": pinned(torch.tensor([int(it["prompt_token"]) for it in items])),
            "video": pinned(torch.stack([it["video"] for it in items]))}


def copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src on one core, without Python's global lock (numpy, on integer views of the same
    bytes). torch's own copy would start an OpenMP team on every core from the loader thread, beside
    the training step's thread that launches the GPU work."""
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dst.element_size()]
    np.copyto(dst.view(as_int).numpy(), src.view(as_int).numpy())


def pinned(t: torch.Tensor) -> torch.Tensor:
    """`t` in pinned memory in the main process when a GPU is present (as `batch_buffer`): a batch whose
    every tensor is pinned moves to the GPU without waiting for the steps already queued there."""
    return t.pin_memory() if get_worker_info() is None and torch.cuda.is_available() else t


class FeatureDataModule(_StoreDataModule):
    def __init__(self, store: str, feature_names: list[str], max_len: int = 2048,
                 context: Callable[[FeatureStore, Row], dict] | None = None, **kw):
        super().__init__(store, **kw)
        if not self.store.has_hidden:
            raise DataError(store, "EAGLE-3 training needs hidden states, this is a tokens-only store",
                            "use a store written by `specalign extract`")
        self.feature_names, self.max_len, self.context = list(feature_names), max_len, context

    def dataset(self, rows):
        return FeatureRows(self.root, rows, self.feature_names, self.max_len, self.context)

    def collate(self, items):
        return collate_features(items)
