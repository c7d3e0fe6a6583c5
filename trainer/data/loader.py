"""Packed token shards as training samples, in an order that is a pure function of (seed, epoch, index).

Sample i of a shard is tokens [i*T, i*T + T + 1): T inputs and their T next-token targets. Samples
never cross shard boundaries (at most T tokens per shard go unused). Global sample number g maps to
epoch g // N and position g % N of that epoch's permutation, so any process can compute any step's
batch without state: the data position in a checkpoint is the number of sequences consumed, and the
order depends neither on the number of processes nor on the batch size.

With train.shift_windows each pass over the data cuts its windows at another token offset: pass e
reads sample i as tokens [i*T + s_e, i*T + s_e + T + 1), s_0 = 0 and s_e seeded by (seed, e) in
[0, T), one sample per shard fewer so that every offset fits. Repeated data is then never seen in
the same T-token windows twice (the reference run's training loss fell in steps at each new pass over
the same windows while its held-out loss rose: docs/reference-run/attempts/SWEEP-2026-11-30.md).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

_SHIFT_STREAM = 0x5348_4946  # "SHIF": keeps the offsets' random stream apart from the permutations'


@lru_cache(maxsize=64)
def window_shift(seed: int, epoch: int, seq_len: int) -> int:
    """Token offset of pass `epoch`'s windows under train.shift_windows: 0 for the first pass, then
    seeded by (seed, epoch), uniform in [0, seq_len)."""
    if epoch == 0:
        return 0
    return int(np.random.default_rng([_SHIFT_STREAM, seed, epoch]).integers(seq_len))


class TokenSamples:
    """Random access to fixed-length samples over memory-mapped shards of one split. shift_seed
    (train.seed, with train.shift_windows): each pass cuts its windows at window_shift's offset."""

    def __init__(self, data_dir: Path, index: dict, split: str, seq_len: int, shift_seed: int | None = None):
        self.seq_len = seq_len
        self.shift_seed = shift_seed
        self.dtype = np.dtype(index["dtype"])
        self.shards, counts = [], []
        for entry in index[split]:
            n = (entry["tokens"] - 1) // seq_len - (shift_seed is not None)  # room for an offset < seq_len
            if n > 0:
                self.shards.append(np.memmap(Path(data_dir) / entry["name"], dtype=self.dtype, mode="r"))
                counts.append(n)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n = int(self.starts[-1])

    def __len__(self) -> int:
        return self.n

    def get(self, ids: np.ndarray, epochs: np.ndarray | None = None) -> np.ndarray:
        """(len(ids), seq_len + 1) int64 array of the samples with these numbers; `epochs` (the pass
        of each) only matters with shift_seed."""
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        shifts = np.zeros(len(ids), dtype=np.int64)
        if self.shift_seed is not None and epochs is not None:
            shifts = np.array([window_shift(self.shift_seed, int(e), self.seq_len) for e in epochs], dtype=np.int64)
        for row, (i, s, shift) in enumerate(zip(ids, shard_of, shifts)):
            offset = (int(i) - int(self.starts[s])) * self.seq_len + int(shift)
            out[row] = self.shards[s][offset: offset + self.seq_len + 1]
        return out


class ConcatSamples:
    """A mixture's sources' samples as one numbering: source s's are offsets[s] .. offsets[s] + len(parts[s])."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.n = int(self.starts[-1])

    def __len__(self) -> int:
        return self.n

    def get(self, ids: np.ndarray, epochs: np.ndarray | None = None) -> np.ndarray:
        """As TokenSamples.get; `epochs` is each sample's pass over its own source."""
        part_of = np.searchsorted(self.starts, ids, side="right") - 1
        out = np.empty((len(ids), self.parts[0].seq_len + 1), dtype=np.int64)
        for p in np.unique(part_of):
            mask = part_of == p
            local = ids[mask] - self.starts[p]
            out[mask] = self.parts[p].get(local) if epochs is None else self.parts[p].get(local, epochs[mask])
        return out


@lru_cache(maxsize=2)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of an epoch's N samples: a seeded permutation, fresh for every epoch."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


def global_sample_ids(seed: int, n: int, start: int, count: int) -> np.ndarray:
    """Sample numbers for global positions [start, start + count)."""
    g = np.arange(start, start + count, dtype=np.int64)
    out = np.empty_like(g)
    for epoch in np.unique(g // n):
        mask = g // n == epoch
        out[mask] = epoch_permutation(seed, int(epoch), n)[g[mask] % n]
    return out


def rank_micro_batches(position: int, samples_per_step: int, rank: int, world: int, micro: int
                       ) -> list[tuple[int, int]]:
    """(start, count) global positions of each micro-batch this rank runs in the step whose first
    sequence is at global `position`.

    The step's samples are split into `world` contiguous slices; each rank cuts its slice into
    micro-batches of `micro` samples."""
    per_rank = samples_per_step // world
    base = position + rank * per_rank
    return [(base + k, micro) for k in range(0, per_rank, micro)]


class BatchLoader:
    """Yields micro-batches on the device, steps from global sequence `position` on, prepared a few
    micro-batches ahead in a thread: (micro, seq_len + 1) int64 for token samples (inputs are
    [:, :-1], targets [:, 1:]); packed SFT rows add a last dimension.

    `wait_seconds` accumulates the time the training loop spent waiting for data."""

    def __init__(self, samples, seed: int, samples_per_step: int, rank: int, world: int, micro: int,
                 device: torch.device, position: int, prefetch: int = 4, order=None):
        """order: (start, count) -> sample numbers of those global positions, or (numbers, pass of
        each) for samples that shift their windows (a mixture's MixtureOrder.sample_ids, or
        .sample_ids_and_passes); None: global_sample_ids over the one stream (and its passes)."""
        self.samples, self.seed, self.device = samples, seed, device
        self.order = order or self._one_stream
        self.spec = (samples_per_step, rank, world, micro)
        self.position = position
        self.wait_seconds = 0.0
        self._q: queue.Queue = queue.Queue(prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, daemon=True)
        self._thread.start()

    def _one_stream(self, start: int, count: int):
        n = len(self.samples)
        ids = global_sample_ids(self.seed, n, start, count)
        if getattr(self.samples, "shift_seed", None) is None:
            return ids
        return ids, np.arange(start, start + count, dtype=np.int64) // n

    def _produce(self):
        pin = self.device.type == "cuda"
        samples_per_step = self.spec[0]
        try:
            for position in itertools.count(self.position, samples_per_step):
                for start, count in rank_micro_batches(position, *self.spec):
                    ids = self.order(start, count)
                    batch = torch.from_numpy(self.samples.get(*ids) if isinstance(ids, tuple)
                                             else self.samples.get(ids))
                    if pin:
                        batch = batch.pin_memory()
                    while not self._stop.is_set():
                        try:
                            self._q.put(batch, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if self._stop.is_set():
                        return
        except BaseException as e:  # noqa: BLE001 - surfaced to the training loop (if it asks for the batch)
            while not self._stop.is_set():  # a capped mixture ends past the last step: close() frees the thread
                try:
                    self._q.put(e, timeout=0.5)
                    return
                except queue.Full:
                    continue

    def next(self) -> torch.Tensor:
        t0 = time.perf_counter()
        batch = self._q.get()
        self.wait_seconds += time.perf_counter() - t0
        if isinstance(batch, BaseException):
            raise batch
        return batch.to(self.device, non_blocking=True)

    def close(self):
        self._stop.set()


def validation_batches(samples, n_sequences: int, batch_size: int, rank: int, world: int):
    """The first n_sequences samples of the validation split (a fixed set, whatever the number of
    processes or the micro-batch), in batches of batch_size, split over ranks round-robin."""
    total = min(n_sequences, len(samples))
    for b, start in enumerate(range(0, total, batch_size)):
        if b % world == rank:
            ids = np.arange(start, min(start + batch_size, total), dtype=np.int64)
            yield torch.from_numpy(samples.get(ids))
