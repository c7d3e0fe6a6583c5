"""A DCP StorageReader that fetches, from the bucket, only the shard files its load plan reads.

A resumed sharded run needs of a DCP checkpoint only the `__<rank>_<n>.distcp` files that hold
pieces of what its ranks load. Which files those are is known only from the load plan over
`.metadata` (each item's _StorageInfo names its file), not from the names: DCP writes an entry
replicated on several ranks into one of their files (fsdp.save_dcp puts all of them in rank 0's).
So each rank's `read_data` first makes sure the files its plan references are in the node's
resume folder (downloaded and checked against the checkpoint's manifest, once per node), then reads
as torch's FileSystemReader does. The node's first rank has fetched the other files (.metadata,
trainer_state.json, rng.pt, config, manifest) before: RunCheckpoints.restore.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader

from trainer.io.storage import Storage, StorageError
from trainer.state.protocol import MANIFEST, fetch_listed_once


class FetchingReader(FileSystemReader):
    """FileSystemReader over `folder` (a checkpoint fetched without its .distcp files) that fetches
    each shard file its plan reads from step `step` of run `run_id` in `store`, verified against
    folder/MANIFEST.json. `needed` and `fetched` (name -> bytes this process downloaded) say what
    it took, for the node's log line."""

    def __init__(self, folder: Path, store: Storage, run_id: str, step: int):
        super().__init__(str(folder))
        self.folder, self.store, self.run_id, self.step = Path(folder), store, run_id, step
        self.listed: dict[str, dict] = json.loads((self.folder / MANIFEST).read_text())["files"]
        self.needed: set[str] = set()
        self.fetched: dict[str, int] = {}

    def read_data(self, plan, planner):
        names = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
        for name in names:
            if name not in self.listed:
                raise StorageError(f"{name} of {self.folder.name} is read by the load plan but not in its manifest")
            got = fetch_listed_once(self.store, self.run_id, self.step, name, self.listed[name], self.folder / name)
            if got:
                self.fetched[name] = got
        self.needed.update(names)
        return super().read_data(plan, planner)
