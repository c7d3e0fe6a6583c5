"""Prepare across nodes: a static share of the units per node, the bucket as the meeting point.

The unit plan (trainer/data/units.py) is a pure function of the corpus bytes, so every node computes
the same one. Node r of N encodes a contiguous run of units holding about 1/N of the input bytes
(`owners`), with its own worker processes (trainer/data/prepare_pool.py), and publishes each
finished unit under `<data key>.prepare/<plan>/` in the bucket: `unit-<n>.npz`, then
`unit-<n>.done.json` (its counts) last, so a unit counts only once it is whole. Node 0, after its
own share, waits until every unit has a done marker and assembles the shards in unit order, reading
the unit files straight from the bucket with ranged GETs (trainer/data/remote.py: the hashes of the
global dedup first, then each unit's tokens), so the shards are byte for byte those of one node.
A rerun after a kill skips every unit already published. A node whose share fails (a bad record
under data.on_error=fail) leaves `node-<r>.error.txt` with the message, which node 0 raises; node 0
gives up, naming the missing units and their nodes, after data.prepare_wait_seconds without a new unit.

Why no scheduler (Ray, datatrove's executors, a claim list): the share of each node is known up
front, the bucket is already the one thing every node reaches, and a node that dies is rerun by
the launcher like any other stage; what a scheduler would add (work stealing from a slow node) is
not worth a service to run. The cost: the slowest node sets the time.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import numpy as np

from trainer.data.remote import open_object
from trainer.data.sources import DataError
from trainer.data.units import Unit, done_path, unit_path
from trainer.io.storage import Storage, join
from trainer.log import logger

POLL_S = 2.0  # how often node 0 lists the bucket while it waits for the other nodes
_DONE = re.compile(r"unit-(\d+)\.done\.json")


def owners(units: list[Unit], nodes: int) -> list[int]:
    """The node of each unit: unit n goes to the node whose 1/nodes slice of the input bytes holds
    its middle, so each node gets a contiguous run of about total/nodes bytes (units without a size,
    a Hub dataset, weigh as much as the average)."""
    sizes = [u.size for u in units]
    mean = sum(sizes) / max(1, sum(1 for s in sizes if s)) or 1.0
    sizes = [s or mean for s in sizes]
    total, at, out = sum(sizes) or 1.0, 0.0, []
    for s in sizes:
        out.append(min(nodes - 1, int((at + s / 2) * nodes / total)))
        at += s
    return out


def ranges_text(ns: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    parts, i = [], 0
    while i < len(ns):
        j = i
        while j + 1 < len(ns) and ns[j + 1] == ns[j] + 1:
            j += 1
        parts.append(f"{ns[i]}" if i == j else f"{ns[i]}-{ns[j]}")
        i = j + 1
    return ", ".join(parts)


@dataclass
class UnitBucket:
    """The units of one plan in the bucket, as one node sees them."""
    store: Storage
    prefix: str  # <data key>.prepare: the plan's folder goes under it
    node: int = 0
    nodes: int = 1
    root: str = ""  # <prefix>/<plan>, set by start()

    def __post_init__(self):
        self._seen: dict[int, dict] = {}

    def start(self, plan: str) -> None:
        """Use the folder of this plan (another plan's units, from other settings, are never mixed in)
        and clear this node's failure marker of an earlier attempt."""
        self.root, self._seen = join(self.prefix, plan), {}
        self.store.delete(self._failure_key(self.node))

    def _failure_key(self, node: int) -> str:
        return join(self.root, f"node-{node}.error.txt")

    def published(self) -> dict[int, dict]:
        """Unit number -> counts, for every unit with a done marker (read once each)."""
        for o in self.store.list(self.root + "/"):
            m = _DONE.fullmatch(o.key.rsplit("/", 1)[-1])
            if m and int(m.group(1)) not in self._seen:
                self._seen[int(m.group(1))] = json.loads(self.store.read_text(o.key))
        return dict(self._seen)

    def publish(self, scratch, n: int, stats: dict) -> None:
        """Upload unit n's file, then its done marker; the local copies go (bounded local disk)."""
        path = unit_path(scratch, n)
        stats = {**stats, "unit_file_bytes": path.stat().st_size}
        self.store.upload_file(path, join(self.root, path.name))
        self.store.write_text(join(self.root, done_path(scratch, n).name), json.dumps(stats))
        self._seen[n] = stats
        path.unlink(missing_ok=True)
        done_path(scratch, n).unlink(missing_ok=True)

    def load(self, n: int):
        """np.load of unit n from the bucket: members are read by ranged GETs as they are used."""
        key = join(self.root, unit_path("", n).name)
        return np.load(open_object(self.store, key, self._seen[n]["unit_file_bytes"], 1 << 20))

    def fail(self, error: BaseException) -> None:
        """Leave this node's failure for node 0 to raise (a bad record names its file and line)."""
        kind = "data" if isinstance(error, DataError) else type(error).__name__
        self.store.write_text(self._failure_key(self.node), f"{kind}\n{error}")

    def clear(self) -> None:
        self.store.delete_prefix(self.prefix + "/")

    def wait_all(self, unit_owners: list[int], timeout_s: float) -> list[dict]:
        """Node 0: every unit's counts once all are published. Raises DataError (or RuntimeError) with
        another node's failure, TimeoutError naming the missing units and nodes after timeout_s
        seconds without a new unit."""
        n_units, last, count = len(unit_owners), time.time(), -1
        logged = 0.0
        while True:
            done = self.published()
            if len(done) == n_units:
                return [done[n] for n in range(n_units)]
            for node in range(1, self.nodes):
                text = self.store.read_text_or_none(self._failure_key(node))
                if text is not None:
                    kind, _, message = text.partition("\n")
                    raise (DataError if kind == "data" else RuntimeError)(f"prepare on node {node}: {message}")
            missing = [n for n in range(n_units) if n not in done]
            if len(done) != count:
                count, last = len(done), time.time()
            elif time.time() - last > timeout_s:
                by_node = {r: [n for n in missing if unit_owners[n] == r] for r in range(self.nodes)}
                raise TimeoutError("prepare: no unit published for {:.0f} s (data.prepare_wait_seconds); missing "
                                   "{}".format(timeout_s, "; ".join(f"node {r}: units {ranges_text(ns)}"
                                                                  for r, ns in by_node.items() if ns)))
            if time.time() - logged > 30:
                logged = time.time()
                logger.info(f"prepare: node 0 waits for {len(missing)} of {n_units} units from the other nodes "
                            f"({self.store.url(self.root)})")
            time.sleep(POLL_S)
