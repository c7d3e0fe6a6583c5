"""The bucket and the shared artifacts in it (tokenizer folder, packed shards) as the stages and
workers find them: node 0 publishes, other nodes wait, every machine downloads once."""

from __future__ import annotations

import fcntl
import json
import time
from dataclasses import dataclass
from pathlib import Path

from trainer.config import Config
from trainer.io.storage import Storage, open_storage


def bucket(cfg: Config) -> Storage:
    return open_storage(cfg.storage.bucket, cfg.storage)


@dataclass(frozen=True)
class Artifacts:
    tokenizer_key: str  # bucket key of the tokenizer folder
    data_key: str  # bucket key of the packed shards folder ("" for a mixture)
    data_keys: tuple[str, ...] = ()  # a mixture (data.weights): each data.sources entry's shards folder, in order

    @property
    def keys(self) -> tuple[str, ...]:
        """Every shards folder the run trains on: the mixture's, else the one."""
        return self.data_keys or (self.data_key,)

    def to_json(self) -> str:
        mixture = {"data_keys": list(self.data_keys)} if self.data_keys else {}  # a plain run's file is as before
        return json.dumps({"tokenizer_key": self.tokenizer_key, "data_key": self.data_key, **mixture})

    @classmethod
    def from_json(cls, text: str) -> "Artifacts":
        saved = json.loads(text)
        return cls(saved["tokenizer_key"], saved["data_key"], tuple(saved.get("data_keys", ())))


def wait_for(store: Storage, key: str, what: str, timeout_s: float = 6 * 3600) -> None:
    """Nodes other than 0 wait for node 0 to publish a shared artifact instead of racing it.
    Raises TimeoutError after timeout_s seconds."""
    deadline = time.time() + timeout_s
    while not store.exists(key):
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what} at {store.url(key)} from node 0")
        time.sleep(5)


def fetch_folder(store: Storage, key: str, local_root: Path) -> Path:
    """Download a bucket folder to local_root/key once per machine (a file lock serialises local ranks)."""
    dest = Path(local_root) / key
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(str(dest) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store.download_dir(key, dest)
    return dest
