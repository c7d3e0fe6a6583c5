"""The publication protocol of a run's checkpoints in the bucket (no torch: `status` and the job's
stages read it without starting torch).

Publishing order (each step only after the previous succeeded):
  1. every file of runs/<id>/checkpoints/step-NNNNNNNN/ except the manifest,
  2. MANIFEST.json (each file with size and sha256): from now on the checkpoint counts,
  3. LATEST (the folder's name), a pointer for people and tools.
A kill at any moment therefore leaves either a complete checkpoint or a folder without a manifest,
which nothing reads. Resume tries complete checkpoints newest first, verifies every file's size and
sha256 after download, and falls back to the previous one (saying so) when one does not match.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

from trainer.io.storage import Storage, StorageError, join
from trainer.log import logger

MANIFEST = "MANIFEST.json"
LATEST = "LATEST"
TRAINING_FILES = ("optimizer.pt", "rng.pt", "trainer_state.json", "config.yaml", MANIFEST)  # not exported


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_prefix(run_id: str) -> str:
    return f"runs/{run_id}/checkpoints"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(paths) -> dict[str, dict]:
    """{file name: {"size": bytes, "sha256": hex}} for the manifest."""
    return {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(paths)}


def write_manifest(local_dir: Path, step: int, files: dict[str, dict] | None = None) -> dict:
    """local_dir/MANIFEST.json listing `files` (default: every file in local_dir)."""
    if files is None:
        files = file_entries(p for p in local_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"step": step, "files": dict(sorted(files.items()))}
    (local_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def publish_folder(store: Storage, local_dir: Path, key: str, step: int = 0, replace: bool = False) -> str:
    """Write local_dir's manifest, upload its files to `key`, and the manifest last, so that a
    reader who finds the manifest finds every file (tokenizers, exports). replace: delete what is
    under `key` first (an export of a newer step)."""
    write_manifest(local_dir, step)
    if replace:
        store.delete_prefix(key + "/")
    store.upload_dir(local_dir, key, skip=(MANIFEST,))
    store.upload_file(local_dir / MANIFEST, join(key, MANIFEST))
    return store.url(key)


def newest_to_export(store: Storage, run_id: str, export_key: str, what: str) -> int | None:
    """The newest complete step of run_id, or None when the folder at export_key already holds
    it (its manifest names that step). Raises FileNotFoundError when the run has no checkpoint."""
    steps = complete_steps(store, run_id)
    if not steps:
        raise FileNotFoundError(f"{what}: no complete checkpoint under {store.url(checkpoints_prefix(run_id))}")
    done = store.read_text_or_none(join(export_key, MANIFEST))
    return None if done and json.loads(done)["step"] == steps[0] else steps[0]


def publish(store: Storage, run_id: str, local_dir: Path, step: int) -> str:
    """Upload a staged checkpoint folder (which already holds its manifest) in the safe order."""
    prefix = join(checkpoints_prefix(run_id), step_name(step))
    if store.exists(join(prefix, MANIFEST)):
        # Saving a step again (after a fallback from a corrupt copy, or a rollback): retract the old
        # manifest first, so no folder of mixed old and new files ever counts, and move LATEST off it.
        latest_key = join(checkpoints_prefix(run_id), LATEST)
        if (store.read_text_or_none(latest_key) or "").strip() == step_name(step):
            older = [s for s in complete_steps(store, run_id) if s < step]
            if older:
                store.write_text(latest_key, step_name(older[0]))
            else:
                store.delete(latest_key)
        store.delete(join(prefix, MANIFEST))
    listed = json.loads((local_dir / MANIFEST).read_text())["files"]
    for name in listed:
        if (local_dir / name).is_file():
            store.upload_file(local_dir / name, join(prefix, name))
    # A sharded checkpoint of several nodes: the other nodes upload their shards (upload_files).
    await_files(store, prefix, {n: m["size"] for n, m in listed.items() if not (local_dir / n).is_file()})
    store.upload_file(local_dir / MANIFEST, join(prefix, MANIFEST))
    store.write_text(join(checkpoints_prefix(run_id), LATEST), step_name(step))
    return store.url(prefix)


NODE_UPLOAD_TIMEOUT_S = 3600.0  # how long the manifest waits for other nodes' shards


def await_files(store: Storage, prefix: str, sizes: dict[str, int], timeout: float = NODE_UPLOAD_TIMEOUT_S) -> None:
    """Block until every file name -> size is under prefix/ with that size (other nodes upload
    them); raise StorageError after timeout seconds. A checkpoint never counts without them."""
    deadline = time.time() + timeout
    for name, size in sizes.items():
        while (info := store.info(join(prefix, name))) is None or info.size != size:
            if time.time() > deadline:
                raise StorageError(f"{store.url(join(prefix, name))} did not arrive from its node within "
                                   f"{timeout:.0f}s")
            time.sleep(1.0)


def upload_files(store: Storage, run_id: str, local_dir: Path, step: int, names: list[str]) -> None:
    """A node's shards of a sharded checkpoint (nodes other than rank 0's), uploaded into the step's
    folder; rank 0's publish() writes the manifest once they are all there. When the step is being
    saved again, waits until rank 0 has retracted the old manifest, so no mixed folder counts."""
    prefix = join(checkpoints_prefix(run_id), step_name(step))
    deadline = time.time() + NODE_UPLOAD_TIMEOUT_S
    while store.exists(join(prefix, MANIFEST)):
        if time.time() > deadline:
            raise StorageError(f"{store.url(prefix)} still has its old manifest after {NODE_UPLOAD_TIMEOUT_S:.0f}s")
        time.sleep(1.0)
    for name in names:
        store.upload_file(local_dir / name, join(prefix, name))


def complete_steps(store: Storage, run_id: str) -> list[int]:
    """Steps whose folder has a manifest, newest first."""
    prefix = checkpoints_prefix(run_id) + "/"
    steps = []
    for o in store.list(prefix):
        parts = o.key[len(prefix):].split("/")
        if len(parts) == 2 and parts[1] == MANIFEST and parts[0].startswith("step-"):
            steps.append(int(parts[0][len("step-"):]))
    return sorted(steps, reverse=True)


def read_manifest(store: Storage, run_id: str, step: int) -> dict:
    """The manifest of a complete checkpoint: {"step": n, "files": {name: {"size", "sha256"}}}."""
    return json.loads(store.read_text(join(checkpoints_prefix(run_id), step_name(step), MANIFEST)))


def fetch_listed(store: Storage, run_id: str, step: int, name: str, meta: dict, dest: Path) -> int:
    """One file of a checkpoint downloaded to dest and checked against its manifest entry `meta`
    (size, sha256); raise StorageError when it is missing or differs. dest appears only once it
    verifies (a temporary name, then os.replace). Returns its size."""
    key = join(checkpoints_prefix(run_id), step_name(step), name)
    if not store.exists(key):
        raise StorageError(f"{store.url(key)} is listed in the manifest but missing")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.unverified")
    try:
        store.download_file(key, tmp)
        if tmp.stat().st_size != meta["size"] or sha256_file(tmp) != meta["sha256"]:
            raise StorageError(f"{store.url(key)} does not match its sha256 in the manifest")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return meta["size"]


def fetch_listed_once(store: Storage, run_id: str, step: int, name: str, meta: dict, dest: Path) -> int:
    """fetch_listed, unless dest is there already (another process of this machine fetched it:
    only verified files ever appear under their name). Under an exclusive lock on a file beside
    dest, so processes that want the same file download it once. Returns the bytes downloaded."""
    with open(dest.with_name(f".{dest.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return 0 if dest.is_file() else fetch_listed(store, run_id, step, name, meta, dest)


def fetch_verified(store: Storage, run_id: str, step: int, dest: Path, skip=None) -> Path:
    """Download a checkpoint and check every file against its manifest; raise StorageError if not.
    skip(name) -> True leaves that file out (DCP shards that a node fetches as its ranks read
    them: trainer/state/shard_reader.py); the manifest in dest still lists every file."""
    manifest = read_manifest(store, run_id, step)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name, meta in manifest["files"].items():
        if skip is None or not skip(name):
            fetch_listed(store, run_id, step, name, meta, dest / name)
    (dest / MANIFEST).write_text(json.dumps(manifest))
    return dest


def fetch_newest(store: Storage, run_id: str, dest_root: Path) -> tuple[int, Path] | None:
    """The newest checkpoint that verifies, downloaded under dest_root; None when there is none."""
    for step in complete_steps(store, run_id):
        try:
            return step, fetch_verified(store, run_id, step, dest_root / step_name(step))
        except StorageError as e:
            logger.warning(f"checkpoint {step_name(step)} is unusable ({e}); falling back to the previous one")
    return None


def prune(store: Storage, run_id: str, keep_last: int, keep: tuple[int, ...] = ()) -> list[int]:
    """Delete complete checkpoints beyond the newest keep_last (and any in `keep`); manifest first,
    so a half-deleted folder never counts."""
    removed = []
    for step in complete_steps(store, run_id)[keep_last:]:
        if step in keep:
            continue
        prefix = join(checkpoints_prefix(run_id), step_name(step))
        store.delete(join(prefix, MANIFEST))
        store.delete_prefix(prefix + "/")
        removed.append(step)
    return removed


class Uploader:
    """Publishes checkpoints in a background thread, at most one in flight. A failure is raised at
    the next submit() or wait(), never swallowed."""

    def __init__(self, store: Storage, run_id: str, keep_last: int):
        self.store, self.run_id, self.keep_last = store, run_id, keep_last
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _publish(self, local_dir: Path, step: int) -> None:
        url = publish(self.store, self.run_id, local_dir, step)
        pruned = prune(self.store, self.run_id, self.keep_last)
        logger.info(f"checkpoint {step_name(step)} published to {url}"
                    + (f" (pruned {', '.join(map(step_name, pruned))})" if pruned else ""))

    def _work(self, job, step: int, on_done):
        try:
            job()
            if on_done:
                on_done(step)
        except BaseException as e:  # noqa: BLE001 - re-raised in the training thread
            self._error = e

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise StorageError(f"checkpoint upload failed: {err}") from err

    def submit(self, local_dir: Path, step: int, background: bool = True, on_done=None, node_files=None):
        """Publish the staged folder of `step` (files, manifest, LATEST); with node_files, only
        upload those files of a sharded checkpoint (a node other than rank 0's)."""
        self.wait()
        job = (lambda: self._publish(local_dir, step)) if node_files is None else \
            (lambda: upload_files(self.store, self.run_id, local_dir, step, node_files))
        if background:
            self._thread = threading.Thread(target=self._work, args=(job, step, on_done), daemon=False)
            self._thread.start()
        else:
            self._work(job, step, on_done)
            self.wait()
