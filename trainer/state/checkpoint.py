"""Checkpoints: what one holds, how it is saved, restored, published and exported. One format for
every stage (pretraining and SFT):

  config.json, generation_config.json, model.safetensors, tokenizer files   a Hugging Face model
      folder: every checkpoint loads with from_pretrained (chat with it, evaluate it, export it);
  optimizer.pt, rng.pt (every rank's RNG streams), trainer_state.json (the loop's state),
  config.yaml (the resolved config), MANIFEST.json (each file's size and sha256, written last).

Publishing order (each step only after the previous succeeded):
  1. every file of runs/<id>/checkpoints/step-NNNNNNNN/ except the manifest,
  2. MANIFEST.json (each file with size and sha256): from now on the checkpoint counts,
  3. LATEST (the folder's name), a pointer for people and tools.
A kill at any moment therefore leaves either a complete checkpoint or a folder without a manifest,
which nothing reads. Resume tries complete checkpoints newest first, verifies every file's size and
sha256 after download, and falls back to the previous one (saying so) when one does not match.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import time
from pathlib import Path

import torch

from trainer.data.tokenizer import save_tokenizer
from trainer.io.storage import Storage, StorageError, is_s3, join, open_storage, split_url
from trainer.log import logger
from trainer.model.hf_files import write_portable_config
from trainer.parallel import fsdp as sharding
from trainer.parallel.distributed import Dist, rng_state, set_rng_state

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


def fetch_verified(store: Storage, run_id: str, step: int, dest: Path) -> Path:
    """Download a checkpoint and check every file against its manifest; raise StorageError if not."""
    prefix = join(checkpoints_prefix(run_id), step_name(step))
    manifest = json.loads(store.read_text(join(prefix, MANIFEST)))
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name, meta in manifest["files"].items():
        if not store.exists(join(prefix, name)):
            raise StorageError(f"{store.url(join(prefix, name))} is listed in the manifest but missing")
        store.download_file(join(prefix, name), dest / name)
        if (dest / name).stat().st_size != meta["size"] or sha256_file(dest / name) != meta["sha256"]:
            raise StorageError(f"{store.url(join(prefix, name))} does not match its sha256 in the manifest")
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


# Saving and restoring (the training loop's side) -------------------------------------------------

def _write_hf_side(local_dir: Path, model, tokenizer, state: dict, config_yaml: str, rng_states: list) -> None:
    """Everything of a checkpoint but the weights and optimizer state (rank 0)."""
    write_portable_config(local_dir)  # config.json that transformers 4.x, vLLM and llama.cpp read too
    save_tokenizer(tokenizer, local_dir, model.config.max_position_embeddings)
    torch.save(rng_states, local_dir / "rng.pt")
    (local_dir / "trainer_state.json").write_text(json.dumps(state, indent=1))
    (local_dir / "config.yaml").write_text(config_yaml, encoding="utf-8")


def save(local_dir: Path, model, tokenizer, optimizer, state: dict, config_yaml: str, rng_states: list) -> None:
    """Write a complete checkpoint folder (see the module docstring), manifest last. model: the bare
    Hugging Face model (not a DDP or compiled wrapper), its generation_config already holding the
    export's defaults (hf_files.export_generation_config); state: the loop state, with "step"."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Writing model shards" bar at every checkpoint says nothing
    shutil.rmtree(local_dir, ignore_errors=True)
    local_dir.mkdir(parents=True)
    model.save_pretrained(str(local_dir), max_shard_size="1000GB")  # one model.safetensors, whatever the size
    torch.save(optimizer.state_dict(), local_dir / "optimizer.pt")
    _write_hf_side(local_dir, model, tokenizer, state, config_yaml, rng_states)
    write_manifest(local_dir, state["step"])


def load(ckpt_dir: Path, model, optimizer, d: Dist, seed: int) -> dict:
    """Load a verified checkpoint folder into the model (bare or sharded), the optimizer and this
    rank's RNG streams; return its trainer state. Either format loads into either kind of model:
    DCP shards (sharding.load_dcp reshards) or model.safetensors + optimizer.pt. Checkpoints saved by
    another number of processes reseed the RNG (seed + 1000 x step + rank): the data order does not
    depend on it, dropout-free models neither. Reads older checkpoints too (model.safetensors
    written by safetensors.save_model)."""
    from safetensors.torch import load_file, load_model

    if (ckpt_dir / sharding.DCP_METADATA).is_file():
        sharding.load_dcp(ckpt_dir, model, optimizer)
    elif sharding.is_sharded(model):
        weights = load_file(str(ckpt_dir / "model.safetensors"))
        if getattr(model.config, "tie_word_embeddings", False):
            weights.setdefault("lm_head.weight", weights.get("model.embed_tokens.weight"))
            weights.setdefault("model.embed_tokens.weight", weights.get("lm_head.weight"))
        sharding.load_full_into_sharded(model, optimizer, weights,
                                        torch.load(ckpt_dir / "optimizer.pt", map_location="cpu", weights_only=False))
    else:
        load_model(model, str(ckpt_dir / "model.safetensors"))  # tied embeddings: either file layout
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location=d.device, weights_only=False))
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    rngs = torch.load(ckpt_dir / "rng.pt", weights_only=False)
    if len(rngs) == d.world:
        set_rng_state(rngs[d.rank])
    else:
        torch.manual_seed(seed + 1000 * state["step"] + d.rank)
    return state


class Checkpointer:
    """One run's checkpoints as the training loop uses them, on every rank: restore the newest
    complete one (rank 0 verifies it, the first rank of every other node fetches that same step),
    save (every rank's RNG gathered; rank 0 writes, or every rank its shards of a sharded model),
    publish in the background (at most one upload in flight per node)."""

    def __init__(self, store: Storage, run_id: str, local_root: Path, keep_last: int, d: Dist):
        self.store, self.run_id, self.local_root, self.d = store, run_id, Path(local_root), d
        self.uploader = Uploader(store, run_id, keep_last)
        self._staged: int | None = None
        self._node_files: list[str] | None = None  # a sharded checkpoint's files this node uploads

    @property
    def _node(self) -> int:
        return self.d.rank - self.d.local_rank  # the first rank of this node (torchrun numbers nodes contiguously)

    def restore(self, model, optimizer, seed: int) -> dict | None:
        """The newest verified checkpoint loaded into model and optimizer; its trainer state, or
        None when the run has none."""
        found = fetch_newest(self.store, self.run_id, self.local_root / "resume") if self.d.main else None
        step = self.d.broadcast_object(found[0] if found else -1)
        if step < 0:
            return None
        folder = (self.local_root / "resume" if self._node == 0 else self.local_root / f"resume-node{self._node}")
        if self._node != 0 and self.d.local_rank == 0:
            fetch_verified(self.store, self.run_id, step, folder / step_name(step))
        self.d.barrier()  # every node has the checkpoint
        return load(folder / step_name(step), model, optimizer, self.d, seed)

    def save(self, state: dict, model, tokenizer, optimizer, config_yaml: str) -> None:
        """Stage the checkpoint of state["step"] locally (every rank calls this). Raises
        FloatingPointError, before anything is written, when a weight is not finite."""
        finite = torch.stack([sharding.local(p).detach().isfinite().all() for p in model.parameters()]).all()
        if self.d.any(not bool(finite)):
            raise FloatingPointError(f"non-finite weights at step {state['step']}: refusing to checkpoint them")
        rngs = self.d.all_gather_object(rng_state())
        self._staged = state["step"]
        folder = self.local_root / "staged" / step_name(state["step"])
        if sharding.is_sharded(model):
            self._save_sharded(folder, state, model, tokenizer, optimizer, config_yaml, rngs)
        elif self.d.main:
            save(folder, model, tokenizer, optimizer, state, config_yaml, rngs)

    def _save_sharded(self, folder: Path, state: dict, model, tokenizer, optimizer, config_yaml: str, rngs) -> None:
        """Every rank writes and hashes its DCP shards; rank 0 the rest and the manifest of all."""
        if self.d.local_rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        self.d.barrier()
        sharding.save_dcp(folder, model, optimizer)
        mine = file_entries(folder.glob(f"__{self.d.rank}_*.distcp"))
        everyone = self.d.all_gather_object((self._node, mine))
        ours = [name for node, files in everyone if node == self._node for name in files]
        self._node_files = None if self._node == 0 else ours
        if self.d.main:
            model.config.save_pretrained(str(folder))
            model.generation_config.save_pretrained(str(folder))
            _write_hf_side(folder, model, tokenizer, state, config_yaml, rngs)
            files = file_entries(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".distcp"))
            for _, theirs in everyone:
                files.update(theirs)
            write_manifest(folder, state["step"], files)

    def publish(self, background: bool) -> None:
        """Publish the checkpoint save() staged: rank 0 uploads its files, waits for other nodes'
        shards, writes the manifest, then LATEST; the first rank of every other node uploads its
        node's shards of a sharded checkpoint; the rest do nothing."""
        step = self._staged
        if self.d.main:
            self.uploader.submit(self.local_root / "staged" / step_name(step), step, background=background,
                                 on_done=self._drop_staged)
        elif self.d.local_rank == 0 and self._node_files:
            self.uploader.submit(self.local_root / "staged" / step_name(step), step, background=background,
                                 on_done=self._drop_staged, node_files=self._node_files)

    def wait(self) -> None:
        """Block until the upload in flight is published; raise StorageError if it failed."""
        self.uploader.wait()

    def _drop_staged(self, published: int) -> None:
        """Staged copies older than the one just published are not needed. Newer ones are kept: the
        next checkpoint is staged while this one uploads in the background."""
        root = self.local_root / "staged"
        for p in root.iterdir() if root.is_dir() else []:
            if p.name < step_name(published):  # step-NNNNNNNN names sort by step
                shutil.rmtree(p, ignore_errors=True)


# Exports and model folders ----------------------------------------------------------------------

def export(store: Storage, run_id: str, key: str, local_root: Path, what: str = "export") -> int | None:
    """Publish the newest complete checkpoint's Hugging Face files (all but TRAINING_FILES) at `key`,
    manifest last; return its step, or None when `key` already holds it. Raises FileNotFoundError
    when the run has no checkpoint, StorageError for a checkpoint of an older format (no config.json)."""
    if newest_to_export(store, run_id, key, what) is None:
        return None
    step, src = fetch_newest(store, run_id, Path(local_root) / "runs" / run_id / "export-src")
    if not (src / "config.json").is_file():
        raise StorageError(f"{what}: {step_name(step)} of {run_id} was saved by an older version without "
                           f"config.json; resume the run to write a new checkpoint, then export")
    out = hf_folder(src, Path(local_root) / key)
    publish_folder(store, out, key, step, replace=True)
    return step


def hf_folder(ckpt_dir: Path, out: Path) -> Path:
    """A checkpoint folder as a Hugging Face model folder at `out` (replaced): its files less the
    training state; a sharded checkpoint's weights consolidated into model.safetensors."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in ckpt_dir.iterdir():
        if path.is_file() and path.name not in TRAINING_FILES and not sharding.is_dcp_file(path.name):
            shutil.copy2(path, out / path.name)
    if (ckpt_dir / sharding.DCP_METADATA).is_file():
        sharding.consolidated_weights(ckpt_dir, out)
    return out


CHECKPOINT_URL = re.compile(r"^(?:(?P<root>.*)/)?runs/(?P<run>[^/]+)/checkpoints/step-(?P<step>\d+)/?$")


def model_dir(url: str, storage_cfg, cache_root: Path) -> Path:
    """A local Hugging Face model folder for `url`: an export (runs/<id>/final) or a checkpoint
    (runs/<id>/checkpoints/step-N: downloaded and checked against its manifest), local or s3://.
    Raises FileNotFoundError (one line, naming the URL) when there is no model there."""
    cache = Path(cache_root) / "models" / hashlib.sha256(url.encode()).hexdigest()[:16]
    m = CHECKPOINT_URL.match(url.rstrip("/"))
    if m and (is_s3(url) or not Path(url).expanduser().is_dir() or (Path(url) / MANIFEST).is_file()):
        root = open_storage(m["root"] or ".", storage_cfg)
        if not root.exists(join(checkpoints_prefix(m["run"]), step_name(int(m["step"])), MANIFEST)):
            raise FileNotFoundError(f"{url}: no complete checkpoint there (no {MANIFEST})")
        src = fetch_verified(root, m["run"], int(m["step"]), cache / "checkpoint")
        if (src / sharding.DCP_METADATA).is_file():
            src = hf_folder(src, cache / "consolidated")
    elif is_s3(url):
        store, key = split_url(url, storage_cfg)
        if not store.exists(join(key, "config.json")):
            raise FileNotFoundError(f"{url}: no model there (no config.json); pass <bucket>/runs/<id>/final "
                                    f"or <bucket>/runs/<id>/checkpoints/step-N")
        store.download_dir(key, cache / "download")
        src = cache / "download"
    else:
        src = Path(url).expanduser()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{url}: no model there (no config.json); pass <bucket>/runs/<id>/final or "
                                f"<bucket>/runs/<id>/checkpoints/step-N")
    return src
