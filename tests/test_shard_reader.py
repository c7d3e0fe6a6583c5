"""A node fetches only the DCP shard files its ranks' load plans read (issue 21), on one process.

dcp.save with two writer threads puts a state dict into two .distcp files; the checkpoint sits in
a local-folder bucket with its manifest. shard_reader.FetchingReader, over a folder fetched without
the shards, copies only the file that holds the keys asked for, checked against the manifest, and
loads the same tensors as torch's own reader over the whole folder. RunCheckpoints.restore falls
back to the previous checkpoint when a shard it reads is corrupt or missing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from trainer.io.storage import StorageError, open_storage
from trainer.parallel import fsdp as sharding
from trainer.parallel.distributed import Dist, rng_state
from trainer.state import protocol
from trainer.state.checkpoint import RunCheckpoints
from trainer.state.shard_reader import FetchingReader

RUN = "shards"


def is_shard(name: str) -> bool:
    return name.endswith(".distcp")


def step_folder(bucket: Path, step: int) -> Path:
    return bucket / protocol.checkpoints_prefix(RUN) / protocol.step_name(step)


def publish_state(bucket: Path, step: int, state: dict) -> dict[str, list[str]]:
    """dcp.save of state into two shard files of checkpoint `step`, with its manifest; returns
    {shard file: the keys it holds}."""
    folder = step_folder(bucket, step)
    folder.mkdir(parents=True)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), thread_count=2), no_dist=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    protocol.write_manifest(folder, step)
    meta = dcp.FileSystemReader(str(folder)).read_metadata()
    files: dict[str, list[str]] = {}
    for index, info in meta.storage_data.items():
        files.setdefault(info.relative_path, []).append(index.fqn)
    return files


def test_the_reader_fetches_only_the_files_the_plan_reads(tmp_path):
    store = open_storage(str(tmp_path / "bucket"))
    torch.manual_seed(0)
    saved = {"a": torch.randn(64, 8), "b": torch.randn(64, 8), "c": torch.randn(3)}
    files = publish_state(tmp_path / "bucket", 1, saved)
    assert len(files) == 2, files  # two writer threads: two shard files
    wanted = "a"
    holder = next(name for name, keys in files.items() if wanted in keys)

    folder = protocol.fetch_verified(store, RUN, 1, tmp_path / "resume" / "step-1", skip=is_shard)
    assert not list(folder.glob("*.distcp")) and (folder / sharding.DCP_METADATA).is_file()
    reader = FetchingReader(folder, store, RUN, 1)
    into = {wanted: torch.zeros(64, 8)}
    dcp.load(into, storage_reader=reader, no_dist=True)
    assert torch.equal(into[wanted], saved[wanted])
    assert sorted(p.name for p in folder.glob("*.distcp")) == [holder]  # the other file never came
    assert reader.needed == {holder} and reader.fetched == {holder: (folder / holder).stat().st_size}

    # Everything, through the reader, equals torch's reader over the whole checkpoint.
    full = {k: torch.zeros_like(v) for k, v in saved.items()}
    dcp.load(full, checkpoint_id=str(step_folder(tmp_path / "bucket", 1)), no_dist=True)
    lazy = {k: torch.zeros_like(v) for k, v in saved.items()}
    again = FetchingReader(folder, store, RUN, 1)
    dcp.load(lazy, storage_reader=again, no_dist=True)
    assert all(torch.equal(lazy[k], full[k]) and torch.equal(lazy[k], saved[k]) for k in saved)
    assert again.needed == set(files) and set(again.fetched) == set(files) - {holder}  # fetched once


def test_a_corrupt_shard_the_plan_reads_fails_verification(tmp_path):
    store = open_storage(str(tmp_path / "bucket"))
    files = publish_state(tmp_path / "bucket", 1, {"a": torch.randn(64, 8), "b": torch.randn(64, 8)})
    holder_a = next(name for name, keys in files.items() if "a" in keys)
    other = next(name for name in files if name != holder_a)
    shard = step_folder(tmp_path / "bucket", 1) / other
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    folder = protocol.fetch_verified(store, RUN, 1, tmp_path / "resume" / "step-1", skip=is_shard)
    into = {"a": torch.zeros(64, 8)}
    dcp.load(into, storage_reader=FetchingReader(folder, store, RUN, 1), no_dist=True)  # not read: not fetched
    into["b"] = torch.zeros(64, 8)
    with pytest.raises(CheckpointException) as caught:
        dcp.load(into, storage_reader=FetchingReader(folder, store, RUN, 1), no_dist=True)
    (exc, _), = caught.value.failures.values()
    assert isinstance(exc, StorageError) and "sha256" in str(exc)
    assert not (folder / other).exists()  # only verified files appear under their name


def save_checkpoint(bucket: Path, step: int, model, optimizer) -> None:
    """A DCP checkpoint of model and optimizer (fsdp.save_dcp, one process) with the files
    checkpoint.load reads, published with its manifest."""
    folder = step_folder(bucket, step)
    folder.mkdir(parents=True)
    sharding.save_dcp(folder, model, optimizer)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    torch.save([rng_state()], folder / "rng.pt")
    protocol.write_manifest(folder, step)


def trained(seed: int, steps: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(steps):
        model(torch.randn(4, 8)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


@pytest.mark.parametrize("damage", ["sha256", "missing"])
def test_restore_falls_back_when_a_shard_is_unusable(tmp_path, caplog, damage):
    bucket = tmp_path / "bucket"
    for step in (1, 2):
        save_checkpoint(bucket, step, *trained(step, step))
    shard = step_folder(bucket, 2) / "__0_0.distcp"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(b"x" * shard.stat().st_size)
    d = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    files = RunCheckpoints(open_storage(str(bucket)), RUN, tmp_path / "work", keep_last=2, d=d)
    model, optimizer = trained(99, 1)
    with caplog.at_level(logging.INFO, logger="trainer"):
        state = files.restore(model, optimizer, seed=0)
    assert state["step"] == 1
    assert "step-00000002 is unusable" in caplog.text and "falling back to the previous one" in caplog.text
    assert ("does not match its sha256" if damage == "sha256" else "listed in the manifest but missing") in caplog.text
    expected, expected_opt = trained(1, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    got, want = optimizer.state_dict()["state"], expected_opt.state_dict()["state"]
    assert all(torch.equal(got[i][k], want[i][k]) for i in want for k in want[i])
    assert "fetched 1 of 1 shard files" in caplog.text
