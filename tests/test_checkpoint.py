"""Checkpoint publishing and recovery, on a local folder and on S3 (moto): the same tests for both."""

import json
import logging

import pytest

from trainer.config import StorageConfig
from trainer.io.storage import LocalStorage, S3Storage, StorageError
from trainer.state import protocol
from trainer.state.protocol import (
    LATEST,
    MANIFEST,
    Uploader,
    complete_steps,
    fetch_newest,
    prune,
    publish,
    step_name,
    write_manifest,
)

RUN = "r1"
PREFIX = f"runs/{RUN}/checkpoints"


def staged(tmp_path, step: int):
    """A checkpoint folder as train.save_checkpoint leaves it: files, then the manifest."""
    d = tmp_path / "staged" / step_name(step)
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(bytes([step % 256]) * 3000)
    (d / "optimizer.pt").write_bytes(b"opt" * (100 + step))
    (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    write_manifest(d, step)
    return d


def latest(store):
    return store.read_text_or_none(f"{PREFIX}/{LATEST}")


def record(monkeypatch, store, fail_on: str = "") -> list[str]:
    """Record the keys the store writes, in order; raise on a key ending with fail_on."""
    ops = []
    for name in ("upload_file", "write_bytes"):
        real = getattr(store, name)

        def wrapped(a, b, _real=real, _name=name):
            key = b if _name == "upload_file" else a
            if fail_on and key.endswith(fail_on):
                raise StorageError(f"injected failure writing {key}")
            _real(a, b)
            ops.append(key)
        monkeypatch.setattr(store, name, wrapped)
    return ops


def test_publish_uploads_files_then_manifest_then_latest(store, tmp_path, monkeypatch):
    local = staged(tmp_path, 4)
    ops = record(monkeypatch, store)
    url = publish(store, RUN, local, 4)
    assert url == store.url(f"{PREFIX}/step-00000004")
    files = {f"{PREFIX}/step-00000004/{n}" for n in ("model.safetensors", "optimizer.pt", "trainer_state.json")}
    assert set(ops[:3]) == files
    assert ops[3:] == [f"{PREFIX}/step-00000004/{MANIFEST}", f"{PREFIX}/{LATEST}"]
    assert latest(store) == "step-00000004" and complete_steps(store, RUN) == [4]
    manifest = json.loads(store.read_text(f"{PREFIX}/step-00000004/{MANIFEST}"))
    assert manifest["step"] == 4 and manifest["files"]["model.safetensors"]["size"] == 3000
    assert len(manifest["files"]["model.safetensors"]["sha256"]) == 64


def test_failed_publish_never_counts(store, tmp_path, monkeypatch):
    publish(store, RUN, staged(tmp_path, 4), 4)
    record(monkeypatch, store, fail_on=MANIFEST)
    with pytest.raises(StorageError, match="injected"):
        publish(store, RUN, staged(tmp_path, 8), 8)
    assert complete_steps(store, RUN) == [4] and latest(store) == "step-00000004"
    assert store.exists(f"{PREFIX}/step-00000008/model.safetensors")  # files without a manifest: ignored


def test_folder_without_manifest_is_ignored(store, tmp_path):
    publish(store, RUN, staged(tmp_path, 4), 4)
    store.upload_dir(staged(tmp_path, 8), f"{PREFIX}/step-00000008", skip=(MANIFEST,))  # killed mid-upload
    store.write_text(f"{PREFIX}/step-00000012/{MANIFEST}.tmp", "{}")  # not the manifest's name
    assert complete_steps(store, RUN) == [4]
    step, path = fetch_newest(store, RUN, tmp_path / "fetched")
    assert step == 4 and (path / "model.safetensors").read_bytes() == bytes([4]) * 3000


def test_complete_steps_newest_first(store, tmp_path):
    assert complete_steps(store, RUN) == [] and fetch_newest(store, RUN, tmp_path / "f") is None
    for step in (4, 12, 8):
        publish(store, RUN, staged(tmp_path, step), step)
    assert complete_steps(store, RUN) == [12, 8, 4]
    assert complete_steps(store, "other-run") == []


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(store, tmp_path, damage, caplog):
    for step in (4, 8):
        publish(store, RUN, staged(tmp_path, step), step)
    key = f"{PREFIX}/step-00000008/model.safetensors"
    if damage == "corrupt":
        store.write_bytes(key, b"\xff" * 3000)  # same size, other bytes: only the sha256 tells
    else:
        store.delete(key)
    caplog.set_level(logging.INFO, logger="trainer")
    step, path = fetch_newest(store, RUN, tmp_path / "fetched")
    messages = [r.getMessage() for r in caplog.records]
    assert step == 4 and (path / "model.safetensors").read_bytes() == bytes([4]) * 3000
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 4}
    assert len(messages) == 1 and "step-00000008 is unusable" in messages[0] and "falling back" in messages[0]
    assert ("sha256" if damage == "corrupt" else "missing") in messages[0]
    assert "model.safetensors" in messages[0]


def test_prune_keeps_the_newest(store, tmp_path):
    for step in (1, 2, 3, 4, 5):
        publish(store, RUN, staged(tmp_path, step), step)
    assert prune(store, RUN, keep_last=2, keep=(1,)) == [3, 2]
    assert complete_steps(store, RUN) == [5, 4, 1]
    for step in (2, 3):  # every file gone, not only the manifest
        assert store.list(f"{PREFIX}/{step_name(step)}/") == []
    assert prune(store, RUN, keep_last=2) == [1] and complete_steps(store, RUN) == [5, 4]
    assert latest(store) == "step-00000005"


def test_uploader_publishes_in_the_background_and_prunes(store, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainer")
    done = []
    up = Uploader(store, RUN, keep_last=2)
    for step in (2, 4, 6):
        up.submit(staged(tmp_path, step), step, background=True, on_done=done.append)
    up.wait()
    messages = [r.getMessage() for r in caplog.records]
    assert done == [2, 4, 6] and complete_steps(store, RUN) == [6, 4]
    assert any("step-00000006 published" in m and "pruned step-00000002" in m for m in messages)


def failing_store(bucket, tmp_path):
    if bucket.is_s3:  # a bucket that doesn't exist: NoSuchBucket on every write
        return S3Storage("s3://no-such-bucket/x", StorageConfig(endpoint_url=bucket.endpoint_url, retries=1))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the bucket folder should be")
    return LocalStorage(blocker / "bucket")


def test_uploader_surfaces_a_failing_store(bucket, tmp_path):
    up = Uploader(failing_store(bucket, tmp_path), RUN, keep_last=2)
    up.submit(staged(tmp_path, 4), 4, background=True)
    with pytest.raises(StorageError, match="checkpoint upload failed"):
        up.wait()
    up.wait()  # reported once, then cleared
    up.submit(staged(tmp_path, 8), 8, background=True)
    with pytest.raises(StorageError, match="checkpoint upload failed"):  # the next submit raises it too
        up.submit(staged(tmp_path, 12), 12, background=True)
    with pytest.raises(StorageError, match="checkpoint upload failed"):
        up.submit(staged(tmp_path, 16), 16, background=False)


def test_checkpoint_names():
    assert step_name(42) == "step-00000042" and protocol.checkpoints_prefix("x") == "runs/x/checkpoints"
