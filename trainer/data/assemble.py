"""Prepare's last step: the unit files (trainer/data/units.py) -> packed shards, in unit order.

Exact dedup is decided here, over every unit's hash array at once: a document is dropped iff one
with the same hash comes earlier in (unit, position) order, which is the order the one-process
path reads the corpus in. So the shards are a function of the inputs and settings only (not of
how many workers made the units, nor in what order they finished), and they are byte for byte
those of shards.prepare_shards on the same documents. The kept spans of each unit are then copied
into the train and val ShardWriters with numpy masks (no per-token Python).

Memory: the hashes of every document (8 bytes each) plus np.unique's sort (about 3x that) at once,
e.g. ~2.4 GB for 100 M documents; then one unit at a time.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from trainer.data.shards import ShardWriter
from trainer.data.units import unit_path


def keep_first(hashes: np.ndarray) -> np.ndarray:
    """Boolean mask, True where a hash occurs for the first time in `hashes` (earlier wins)."""
    keep = np.zeros(len(hashes), dtype=bool)
    if len(hashes):
        _, first = np.unique(hashes, return_index=True)  # index of each value's first occurrence
        keep[first] = True
    return keep


def assemble_shards(scratch: Path, stats: list[dict], out_dir: Path, dtype: np.dtype, shard_tokens: int,
                    dedup: bool, load=None, shard_hooks: tuple = (None, None)) -> dict:
    """Write train-*.bin and val-*.bin under out_dir from the len(stats) unit files under scratch
    (stats: each unit's counts from its done marker), or from load(n) (an np.load of unit n: the
    bucket's copy, prepare_nodes.UnitBucket.load). shard_hooks: (open_shard, on_close) for the
    ShardWriters (the stage uploads each shard as it is complete, or streams it into the bucket).
    Returns the index entries that depend on the documents: train, val (shard lists), chars,
    documents, filters (what each filter removed, the units' counts summed) and skipped_records
    (bad records, by reason, summed over the units)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n_units = len(stats)
    load = load or (lambda n: np.load(unit_path(scratch, n)))
    if dedup:
        hashes = []
        for n in range(n_units):
            with load(n) as z:
                hashes.append(z["hashes"])
        keep_all = keep_first(np.concatenate(hashes) if hashes else np.zeros(0, np.uint64))
        del hashes
    writers = {s: ShardWriter(out_dir, s, dtype, shard_tokens, shard_hooks[1], shard_hooks[0])
               for s in ("train", "val")}
    try:
        chars, documents, pos, kept = _copy_units(load, n_units, dedup and keep_all, writers)
        shards = {split: w.close() for split, w in writers.items()}
    except BaseException:  # a failed upload, a signal: no half-written shard is published
        for w in writers.values():
            w.abort()
        raise
    filters, skipped = Counter(), Counter()
    for s in stats:
        filters.update(s["filters"])
        skipped.update(s["skipped"])
    filters.update(removed_duplicate=pos - kept, documents_kept=kept)
    return {"train": shards["train"], "val": shards["val"], "chars": dict(chars),
            "documents": dict(documents), "filters": {k: v for k, v in sorted(filters.items()) if v},
            "skipped_records": dict(sorted(skipped.items()))}


def _copy_units(load, n_units: int, keep_all, writers: dict):
    """The kept documents of every unit, in order, into the train and val writers (keep_all: the
    dedup mask over all documents, or False). Returns (chars, documents, documents read, kept)."""
    chars, documents = Counter(), Counter()
    pos = kept = 0
    for n in range(n_units):
        with load(n) as z:
            val, offsets, unit_chars = z["val"].astype(bool), z["offsets"], z["chars"]
            keep = keep_all[pos:pos + len(val)] if keep_all is not False else np.ones(len(val), dtype=bool)
            pos += len(val)
            kept += int(keep.sum())
            lengths = np.diff(offsets)
            tokens = z["tokens"] if keep.any() else None
            for split, want in (("train", False), ("val", True)):
                picked = keep & (val == want)
                if picked.any():
                    writers[split].write(tokens[np.repeat(picked, lengths)])
                    chars[split] += int(unit_chars[picked].sum())
                    documents[split] += int(picked.sum())
    return chars, documents, pos, kept
