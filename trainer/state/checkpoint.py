"""Checkpoints: what one holds, how it is saved, restored, published and exported. One format for
every stage (pretraining and SFT):

  config.json, generation_config.json, model.safetensors, tokenizer files   a Hugging Face model
      folder: every checkpoint loads with from_pretrained (chat with it, evaluate it, export it);
  optimizer.pt (the optimizer state keyed by parameter name), rng.pt (every rank's RNG streams),
  trainer_state.json (the loop's state), config.yaml (the resolved config), MANIFEST.json (each
  file's size and sha256, written last).

Publishing, verifying and pruning them in the bucket: trainer/state/protocol.py (no torch).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.api import CheckpointException

from trainer.data.tokenizer import save_tokenizer
from trainer.io.storage import Storage, StorageError, is_s3, join, open_storage, split_url
from trainer.log import logger
from trainer.model.hf_files import write_portable_config
from trainer.parallel import fsdp as sharding
from trainer.parallel.distributed import Dist, rng_state, set_rng_state
from trainer.state.protocol import (
    MANIFEST,
    TRAINING_FILES,
    Uploader,
    checkpoints_prefix,
    complete_steps,
    fetch_newest,
    fetch_verified,
    file_entries,
    newest_to_export,
    publish_folder,
    step_name,
    write_manifest,
)
from trainer.state.shard_reader import FetchingReader

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
    torch.save(sharding.named_optimizer_state(model, optimizer), local_dir / "optimizer.pt")
    _write_hf_side(local_dir, model, tokenizer, state, config_yaml, rng_states)
    write_manifest(local_dir, state["step"])


def load(ckpt_dir: Path, model, optimizer, d: Dist, seed: int, reader=None) -> dict:
    """Load a verified checkpoint folder into the model (bare or sharded), the optimizer and this
    rank's RNG streams; return its trainer state. Either format loads into either kind of model:
    DCP shards (sharding.load_dcp reshards) or model.safetensors + optimizer.pt. Checkpoints saved by
    another number of processes reseed the RNG (seed + 1000 x step + rank): the data order does not
    depend on it, dropout-free models neither. Reads older checkpoints too (model.safetensors
    written by safetensors.save_model, optimizer.pt keyed by parameter index). reader: the DCP
    StorageReader of the shards (default: all of them in ckpt_dir)."""
    if (ckpt_dir / sharding.DCP_METADATA).is_file():
        sharding.load_dcp(ckpt_dir, model, optimizer, reader)
    else:
        _load_hf_side(ckpt_dir, model, optimizer, d)
    state = json.loads((ckpt_dir / "trainer_state.json").read_text())
    rngs = torch.load(ckpt_dir / "rng.pt", weights_only=False)
    if len(rngs) == d.world:
        set_rng_state(rngs[d.rank])
    else:
        torch.manual_seed(seed + 1000 * state["step"] + d.rank)
    return state


def _load_hf_side(ckpt_dir: Path, model, optimizer, d: Dist) -> None:
    """model.safetensors and optimizer.pt into the model (sharded or not) and its optimizer. An
    optimizer.pt keyed by parameter index (saved before 2026-12-03) is migrated to names, logged."""
    from safetensors.torch import load_file, load_model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if sharding.is_sharded(model):
        weights = load_file(str(ckpt_dir / "model.safetensors"))
        if getattr(model.config, "tie_word_embeddings", False):
            weights.setdefault("lm_head.weight", weights.get("model.embed_tokens.weight"))
            weights.setdefault("model.embed_tokens.weight", weights.get("lm_head.weight"))
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    else:
        load_model(model, str(ckpt_dir / "model.safetensors"))  # tied embeddings: either file layout
    saved = torch.load(ckpt_dir / "optimizer.pt", map_location="cpu" if sharding.is_sharded(model) else d.device,
                       weights_only=False)
    if sharding.load_named_optimizer_state(model, optimizer, saved) and d.main:
        logger.info(f"checkpoint: {ckpt_dir.name}'s optimizer.pt is keyed by parameter index (saved before "
                    "2026-12-03); migrated to parameter names")


class RunCheckpoints:
    """One run's checkpoint files as the training loop uses them, on every rank: restore the newest
    complete one that verifies (the first rank of each node fetches its files but the DCP shards,
    each rank the shard files its load plan reads: a node downloads only what its ranks need),
    save (every rank's RNG gathered; rank 0 writes, or every rank its shards of a sharded model),
    publish in the background (at most one upload in flight per node), then prune to keep_last.
    When to save, and what else a checkpoint takes: trainer/training/checkpointer.py."""

    def __init__(self, store: Storage, run_id: str, local_root: Path, keep_last: int, d: Dist):
        self.store, self.run_id, self.local_root, self.d = store, run_id, Path(local_root), d
        self.uploader = Uploader(store, run_id, keep_last)
        self._staged: int | None = None
        self._node_files: list[str] | None = None  # a sharded checkpoint's files this node uploads

    @property
    def _node(self) -> int:
        return self.d.rank - self.d.local_rank  # the first rank of this node (torchrun numbers nodes contiguously)

    @property
    def _resume_root(self) -> Path:
        return self.local_root / ("resume" if self._node == 0 else f"resume-node{self._node}")

    def restore(self, model, optimizer, seed: int) -> dict | None:
        """The newest checkpoint that verifies, loaded into model and optimizer; its trainer state,
        or None when the run has none. A checkpoint with a missing or corrupt file is skipped
        (logged) for the previous one, as protocol.fetch_newest does: every rank decides alike.
        Raises StorageError when the run has complete checkpoints and none of them verifies:
        starting again from scratch would spend the run's compute again and publish over them."""
        steps = self.d.broadcast_object(complete_steps(self.store, self.run_id) if self.d.main else None)
        first = None
        for step in steps:
            problem, state = self._try_restore(step, model, optimizer, seed)
            if problem is None:
                return state
            first = first or f"{step_name(step)}: {problem}"
            if self.d.main:
                logger.warning(f"checkpoint {step_name(step)} is unusable ({problem}); falling back to the "
                               "previous one")
        if steps:
            raise StorageError(f"none of the {len(steps)} complete checkpoint(s) of run {self.run_id!r} verifies "
                               f"(newest, {first}); nothing was trained or written: restore them in the bucket, "
                               f"delete them to start the run again, or set another run.id")
        return None

    def _try_restore(self, step: int, model, optimizer, seed: int) -> tuple[str | None, dict | None]:
        """(None, trainer state) with `step` loaded, or (why it is unusable, None). The first rank of
        each node fetches the files that are not DCP shards; the shards come as the ranks' load plans
        read them (shard_reader.FetchingReader), each file once per node."""
        folder = self._resume_root / step_name(step)
        problem = None
        if self.d.local_rank == 0:
            try:
                fetch_verified(self.store, self.run_id, step, folder, skip=lambda name: name.endswith(".distcp"))
            except StorageError as e:
                problem = str(e)
        problems = [p for p in self.d.all_gather_object(problem) if p]  # also the barrier: the node's files are there
        if problems:
            return problems[0], None
        reader = FetchingReader(folder, self.store, self.run_id, step) if (folder / sharding.DCP_METADATA).is_file() \
            else None
        try:
            state = load(folder, model, optimizer, self.d, seed, reader)
        except CheckpointException as e:  # DCP raises it on every rank when one rank's read failed
            unusable = [exc for exc, _ in e.failures.values() if isinstance(exc, StorageError)]
            if not unusable:
                raise
            return str(unusable[0]), None
        if reader is not None:
            self._log_fetched(reader)
        return None, state

    def _log_fetched(self, reader: FetchingReader) -> None:
        """One line per node on rank 0: how many of the checkpoint's shard files and bytes it fetched."""
        shards = {n: m["size"] for n, m in reader.listed.items() if n.endswith(".distcp")}
        nodes: dict[int, list] = {}  # first rank of the node -> [its ranks, files read, bytes fetched]
        for rank, (node, needed, fetched) in enumerate(
                self.d.all_gather_object((self._node, reader.needed, sum(reader.fetched.values())))):
            ranks, names, total = nodes.setdefault(node, [[], set(), 0])
            nodes[node] = [ranks + [rank], names | needed, total + fetched]
        for ranks, names, fetched in (nodes[n] for n in sorted(nodes)):
            logger.info(f"resume: the node of rank(s) {ranks[0]}-{ranks[-1]} fetched {len(names)} of {len(shards)} "
                        f"shard files ({fetched / 1e6:.2f} of {sum(shards.values()) / 1e6:.2f} MB)")

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

def export(store: Storage, run_id: str, key: str, local_root: Path, what: str = "export",
           card: Callable[[Path], str] | None = None) -> int | None:
    """Publish the newest complete checkpoint's Hugging Face files (all but TRAINING_FILES) at `key`,
    manifest last; return its step, or None when `key` already holds it. `card(checkpoint folder)`
    gives the export's README.md (its model card), written before the manifest. Raises
    FileNotFoundError when the run has no checkpoint, StorageError for a checkpoint of an older
    format (no config.json)."""
    if newest_to_export(store, run_id, key, what) is None:
        return None
    step, src = fetch_newest(store, run_id, Path(local_root) / "runs" / run_id / "export-src")
    if not (src / "config.json").is_file():
        raise StorageError(f"{what}: {step_name(step)} of {run_id} was saved by an older version without "
                           f"config.json; resume the run to write a new checkpoint, then export")
    out = hf_folder(src, Path(local_root) / key)
    if card is not None:
        (out / "README.md").write_text(card(src), encoding="utf-8")
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


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name on the Hugging Face Hub


def hub_snapshot(repo_id: str, dest: Path) -> Path:
    """The config, tokenizer and safetensors files of Hub model `repo_id` (huggingface_hub, which
    reads HF_TOKEN and HF_ENDPOINT), in dest. FileNotFoundError (one line) when the Hub cannot be
    reached or has no such model."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_dir=str(dest), allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))
    except Exception as e:  # offline, gated, missing: huggingface_hub raises several kinds
        raise FileNotFoundError(f"{repo_id}: not a local folder, and the Hugging Face Hub gave no model "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def model_dir(url: str, storage_cfg, cache_root: Path) -> Path:
    """A local Hugging Face model folder for `url`: an export (runs/<id>/final) or a checkpoint
    (runs/<id>/checkpoints/step-N: downloaded and checked against its manifest), local or s3://,
    or a Hugging Face Hub id (owner/name, when no such local path exists).
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
    elif HUB_ID.match(url) and not Path(url).expanduser().exists():
        src = hub_snapshot(url, cache / "hub")
    else:
        src = Path(url).expanduser()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{url}: no model there (no config.json); pass <bucket>/runs/<id>/final or "
                                f"<bucket>/runs/<id>/checkpoints/step-N")
    return src
