"""Data mixtures (data.weights): the sample order over several sources as a pure function of (seed,
global position), each source's passes capped (data.max_epochs), without torch (`status` and the
report count tokens per source from a checkpoint's data position with it).

The order comes in phases. In a phase the active sources (those not yet at their cap) share the
positions by weight: each block of BLOCK positions gives source s exactly its largest-remainder
quota q_s of BLOCK (weights renormalised over the active sources), interleaved by smooth weighted
round robin (the pattern nginx balances with), so every window of positions, not only whole blocks,
holds each source within about one sample of its weight. A seeded permutation of the block would
mix as well but its short windows are hypergeometric (weight 0.1 over 640 positions: 0.7 points of
standard deviation), and the samples themselves are random anyway: the j-th sample drawn from source
s is position j of that source's own order, a seeded permutation per pass (as loader.py's single
stream). A phase ends right after the draw that brings a capped source to max_epochs * n_s samples;
the next phase shares its weight among the rest. Phases are computed once (at most one per source),
so what every source has given before any position is closed form: no iteration from 0, and a
resume at a checkpoint's data position needs no skipping. When every active source is capped the
mixture ends after the last one's last sample (`total`): the run's step count is capped there.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from trainer.config import Config, ConfigError
from trainer.data.shards import check_trainable as check_source

BLOCK = 1000  # positions per block: weights are quantised to 1/BLOCK (70/20/10 % exactly)
_SOURCE_STREAM, = np.frombuffer(b"mix\0", dtype=np.uint32)  # keeps the sources' orders apart from loader.py's


def quotas(weights, block: int = BLOCK) -> np.ndarray:
    """Each source's share of a block of `block` positions: the largest-remainder rounding of
    block * w / sum(w), at least 1 for every positive weight (taken from the largest quota).
    Zero weights (sources already at their cap) get 0."""
    w = np.asarray(weights, dtype=np.float64)
    raw = w / w.sum() * block
    q = np.floor(raw).astype(np.int64)
    q[np.argsort(-(raw - q), kind="stable")[: block - int(q.sum())]] += 1
    for s in np.flatnonzero((w > 0) & (q == 0)):
        q[int(np.argmax(q))] -= 1
        q[s] = 1
    return q


@lru_cache(maxsize=16)
def block_pattern(q: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source of each position of a block, how many times that source came earlier in the block,
    (len(block) + 1, S) counts per source before each offset) for quotas q: smooth weighted round
    robin, each step giving the position to the source furthest behind its share (lowest index on ties)."""
    q_arr, total = np.asarray(q, dtype=np.int64), int(sum(q))
    current = np.zeros(len(q), dtype=np.int64)
    src = np.empty(total, dtype=np.int64)
    for i in range(total):
        current += q_arr
        s = int(np.argmax(current))
        current[s] -= total
        src[i] = s
    before = np.zeros((total + 1, len(q)), dtype=np.int64)
    before[1:] = np.cumsum(np.eye(len(q), dtype=np.int64)[src], axis=0)
    return src, before[np.arange(total), src], before


@dataclass(frozen=True)
class Phase:
    start: int  # first global position of the phase
    q: tuple[int, ...]  # per-source quota of every block (0: capped out)
    drawn: np.ndarray  # (S,) samples each source gave before `start`
    end: int | None  # first position after the phase; None: it never ends (an uncapped source is active)


class MixtureOrder:
    """The mixture's order: position g -> (source, j: the j-th sample drawn from that source) ->
    the sample's number in the concatenation of the sources' training samples (source s's samples
    are numbers offsets[s] .. offsets[s] + sizes[s])."""

    def __init__(self, seed: int, sizes, weights, max_epochs=()):
        self.seed = int(seed)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.weights = np.asarray(weights, dtype=np.float64)
        caps = list(max_epochs) or [0.0] * len(self.sizes)
        # A cap of e passes is floor(e * n) samples; 0: no cap.
        self.limits = [int(e * n) if e else None for e, n in zip(caps, self.sizes.tolist())]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.phases = self._phases()
        self._perms: dict[int, dict[int, np.ndarray]] = {}  # per source, the last two passes' orders
        self._lock = threading.Lock()
        last = self.phases[-1]
        self.total = last.end  # positions in the whole mixture; None: unbounded

    def _phases(self) -> list[Phase]:
        phases: list[Phase] = []
        start, drawn = 0, np.zeros(len(self.sizes), dtype=np.int64)
        while True:
            active = [s for s, lim in enumerate(self.limits) if self.sizes[s] > 0 and (lim is None or drawn[s] < lim)]
            if not active:
                break
            q = tuple(quotas([self.weights[s] if s in active else 0.0 for s in range(len(self.sizes))]).tolist())
            ends = [self._local_end(q, s, self.limits[s] - int(drawn[s])) for s in active if self.limits[s] is not None]
            end = start + min(ends) if ends else None
            phases.append(Phase(start, q, drawn.copy(), end))
            if end is None:
                break
            drawn = drawn + self._counts(q, end - start)
            start = end
        if not phases:  # every source empty or capped at 0 samples
            phases.append(Phase(0, (0,) * len(self.sizes), np.zeros(len(self.sizes), dtype=np.int64), 0))
        return phases

    @staticmethod
    def _local_end(q: tuple[int, ...], s: int, r: int) -> int:
        """The phase-relative position after source s's r-th draw (r >= 1) under quotas q."""
        src, _, _ = block_pattern(q)
        b, t = divmod(r - 1, q[s])
        return b * len(src) + int(np.flatnonzero(src == s)[t]) + 1

    @staticmethod
    def _counts(q: tuple[int, ...], h: int) -> np.ndarray:
        """(S,) draws per source in a phase's first h positions: whole blocks, then the partial one."""
        if h <= 0 or not any(q):
            return np.zeros(len(q), dtype=np.int64)
        _, _, before = block_pattern(q)
        b, off = divmod(h, len(before) - 1)
        return b * np.asarray(q, dtype=np.int64) + before[off]

    def _phase_at(self, g: int) -> int:
        for p in range(len(self.phases) - 1, -1, -1):
            if self.phases[p].start <= g:
                return p
        return 0

    def drawn_before(self, g: int) -> np.ndarray:
        """(S,) samples each source gave in positions [0, g): tokens per source are these times
        train.seq_len; passes are these over the sources' sizes. Past `total`, the totals."""
        if self.total is not None:
            g = min(g, self.total)
        phase = self.phases[self._phase_at(g)]
        return phase.drawn + self._counts(phase.q, g - phase.start)

    def draws(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, j) of global positions [start, start + count): position g is the j-th draw from
        its source (j counted from 0 over the whole run)."""
        if self.total is not None and start + count > self.total:
            raise IndexError(f"the mixture ends at position {self.total}: every source is at its data.max_epochs "
                             f"cap (asked for positions up to {start + count})")
        sources = np.empty(count, dtype=np.int64)
        js = np.empty(count, dtype=np.int64)
        g, done = start, 0
        while done < count:
            p = self._phase_at(g)
            phase = self.phases[p]
            src, rank, _ = block_pattern(phase.q)
            h = g - phase.start
            b, off = divmod(h, len(src))
            n = min(count - done, len(src) - off)
            if phase.end is not None:
                n = min(n, phase.end - g)
            s = src[off: off + n]
            sources[done: done + n] = s
            js[done: done + n] = phase.drawn[s] + b * np.asarray(phase.q, dtype=np.int64)[s] + rank[off: off + n]
            g, done = g + n, done + n
        return sources, js

    def sample_ids(self, start: int, count: int) -> np.ndarray:
        """Numbers (in the concatenation of the sources) of the samples at positions [start, start + count)."""
        return self.sample_ids_and_passes(start, count)[0]

    def sample_ids_and_passes(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """sample_ids, and each sample's pass over its own source (train.shift_windows' offsets)."""
        sources, js = self.draws(start, count)
        out = np.empty(count, dtype=np.int64)
        passes = np.empty(count, dtype=np.int64)
        for s in np.unique(sources):
            mask = sources == s
            n = int(self.sizes[s])
            j = js[mask]
            local = np.empty(len(j), dtype=np.int64)
            for epoch in np.unique(j // n):
                sel = j // n == epoch
                local[sel] = self._permutation(int(s), int(epoch))[j[sel] % n]
            out[mask] = self.offsets[s] + local
            passes[mask] = j // n
        return out, passes

    def _permutation(self, s: int, epoch: int) -> np.ndarray:
        """source_permutation, kept for the last two passes of every source (a global cache of a few
        entries would recompute a large source's order at every micro-batch of a many-source mixture)."""
        with self._lock:  # a closed loader's thread may still be finishing a batch while the next one starts
            kept = self._perms.setdefault(s, {})
            if epoch not in kept:
                if len(kept) >= 2:
                    del kept[min(kept)]
                kept[epoch] = source_permutation(self.seed, s, epoch, int(self.sizes[s]))
            return kept[epoch]


def source_permutation(seed: int, source: int, epoch: int, n: int) -> np.ndarray:
    """The order of one pass over source `source`'s n samples: seeded by (seed, source, pass)."""
    return np.random.default_rng([int(_SOURCE_STREAM), seed, source, epoch]).permutation(n).astype(np.int64)


# Sources and their names -------------------------------------------------------------------------

def source_names(sources) -> list[str]:
    """A short name per data.sources entry for metrics (val_loss/<name>), the report and status: the
    last part of its path that is not a glob, without extensions ("data/web/*.jsonl.zst" -> "web",
    "s3://b/books.parquet" -> "books", "hf://datasets/owner/name" -> "name"); a repeated name gets
    "-2", "-3", ... in order."""
    names: list[str] = []
    for source in sources:
        parts = [p for p in re.split(r"[/\\]", source.rstrip("/\\")) if p and not re.search(r"[*?\[]", p)]
        name = parts[-1] if parts else "source"
        name = re.sub(r"[^A-Za-z0-9_.\-\u4e00-\u9fff]", "_", name.split(".")[0] or name) or "source"
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def train_sizes(indexes, seq_len: int) -> list[int]:
    """Training samples of seq_len + 1 tokens per source, from their shards' index.json (as
    loader.TokenSamples counts them)."""
    return [sum(max(0, (s["tokens"] - 1) // seq_len) for s in index["train"]) for index in indexes]


def describe(names, keys, weights, max_epochs=()) -> str:
    """The mixture as the inputs contract records it (LoopState.inputs["data"]): each source's data
    key, share and cap, so a resume with other weights, caps or sources is refused."""
    w = np.asarray(weights, dtype=np.float64)
    caps = list(max_epochs) or [0.0] * len(keys)
    return "mixture " + ", ".join(f"{name}={key.rsplit('/', 1)[-1]} {share:.6g}"
                                  + (f" max_epochs {cap:g}" if cap else "")
                                  for name, key, share, cap in zip(names, keys, (w / w.sum()).tolist(), caps))


def source_progress(sources, weights, max_epochs, seed: int, seq_len: int, indexes, position: int) -> list[dict]:
    """Each source of a mixture at data position `position` (a checkpoint's LoopState.data_position):
    name, share of the weights, cap (0: none), training sequences, sequences and tokens drawn, passes."""
    sizes = train_sizes(indexes, seq_len)
    drawn = MixtureOrder(seed, sizes, weights, max_epochs).drawn_before(position)
    w = np.asarray(weights, dtype=np.float64)
    caps = list(max_epochs) or [0.0] * len(sizes)
    return [{"name": name, "share": share, "max_epochs": cap, "sequences": n, "drawn": int(d),
             "tokens": int(d) * seq_len, "epochs": int(d) / max(1, n)}
            for name, share, cap, n, d in zip(source_names(sources), (w / w.sum()).tolist(), caps, sizes, drawn)]


def describe_progress(rows: list[dict]) -> str:
    """One line of source_progress's rows: `web 70.0%: 1,234,560 tokens, 0.412 epochs; ...`."""
    return "; ".join(f"{r['name']} {r['share']:.1%}" + (f" (max {r['max_epochs']:g} epochs)" if r["max_epochs"] else "")
                     + f": {r['tokens']:,} tokens, {r['epochs']:.3f} epochs" for r in rows)


def components(cfg: Config) -> list[Config]:
    """A mixture's sources as configs of one source each, which stage_prepare prepares alone: each
    its own data/<hash> (the key a run on that source alone has), so new weights or another source
    re-prepare nothing that is there, and exact dedup is within a source."""
    return [dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=(s,), weights=(), max_epochs=()))
            for s in cfg.data.sources]


def data_name(data_cfg, keys) -> str:
    """What the inputs contract calls the data (LoopState.inputs["data"]): the shards folder's hash,
    or a mixture's `describe`."""
    if not data_cfg.weights:
        return keys[0].rsplit("/", 1)[-1]
    return describe(source_names(data_cfg.sources), keys, data_cfg.weights, data_cfg.max_epochs)


def check_trainable(cfg, indexes) -> None:
    """shards.check_trainable of every source (DataError, exit 2, with its counts), and for a
    mixture whose every source is capped, at least one step's sequences before it ends."""
    for index in indexes:
        check_source(index, cfg.train.seq_len)
    if not cfg.data.weights:
        return
    order = MixtureOrder(cfg.train.seed, train_sizes(indexes, cfg.train.seq_len), cfg.data.weights,
                         cfg.data.max_epochs)
    per_step = cfg.train.batch_tokens // cfg.train.seq_len
    if order.total is not None and order.total < per_step:
        raise ConfigError(f"data.max_epochs: the capped sources give {order.total} sequences in all, fewer than one "
                          f"step's {per_step} (train.batch_tokens / train.seq_len); raise the caps or set one to 0")


def corpus_summary(cfg, indexes, position: int) -> dict[str, str]:
    """report.md's corpus rows: documents read and kept, what the filters removed and the bad
    records skipped (summed over a mixture's sources), and with a mixture each source's tokens
    and passes at data position `position` (a checkpoint's LoopState.data_position)."""
    if not indexes:
        return {}
    total: dict[str, dict[str, int]] = {"filters": {}, "skipped_records": {}}
    for index in indexes:
        for part in total:
            for k, v in index.get(part, {}).items():
                total[part][k] = total[part].get(k, 0) + v
    filters = total["filters"]
    out = {"corpus documents: read / kept": f"{filters.get('documents_read', 0):,} / "
                                            f"{filters.get('documents_kept', 0):,}",
           "documents removed by filters": ", ".join(f"{k}: {v:,}" for k, v in filters.items()
                                                     if k.startswith("removed")) or "none",
           "bad records skipped": ", ".join(f"{k}: {v:,}" for k, v in total["skipped_records"].items()) or "none"}
    if cfg.data.weights and len(indexes) == len(cfg.data.sources):
        d = cfg.data
        rows = source_progress(d.sources, d.weights, d.max_epochs, cfg.train.seed, cfg.train.seq_len, indexes, position)
        out["mixture: tokens and epochs per source"] = describe_progress(rows)
    return out
