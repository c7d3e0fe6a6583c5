"""A corrupt checkpoint in the bucket (a file whose sha256 does not match the manifest, a missing
file): a real resume says so, falls back to the previous complete checkpoint, and still ends with
the weights of an uninterrupted run. Saving a step again never leaves a counted folder of mixed
files, nor LATEST on a folder without a manifest.
"""

from __future__ import annotations

import json

import pytest

from faults import (  # noqa: F401
    checkpoint_tensors,
    copy_bucket,
    in_process,
    make_config,
    s3_prefix,
    s3_server,
    template,
    tiny_settings,
    train_in_process,
    upload_bucket,
)
from trainer.io.storage import open_storage
from trainer.state import protocol


@pytest.mark.parametrize("damage,backend", [("sha256", "local"), ("missing", "s3")])
def test_resume_falls_back_from_a_corrupt_checkpoint_and_says_so(damage, backend, template, tmp_path, in_process,
                                                                 caplog, request):
    if backend == "s3":
        endpoint = request.getfixturevalue("s3_server")
        settings = tiny_settings(template["corpus"], s3_prefix(), str(tmp_path / "work"), endpoint)
        upload_bucket(template, open_storage(settings["storage.bucket"], make_config(settings).storage))
    else:
        settings = tiny_settings(template["corpus"], str(copy_bucket(template, tmp_path / "bucket")),
                                 str(tmp_path / "work"))
    store = open_storage(settings["storage.bucket"], make_config(settings).storage)
    train_in_process({**settings, "run.id": "straight", "train.max_steps": 12}, template)
    train_in_process({**settings, "train.max_steps": 12, "train.checkpoint_every_steps": 4}, template)
    # Damage the newest checkpoint, then lengthen the run so that it resumes.
    prefix = f"{protocol.checkpoints_prefix('rel')}/{protocol.step_name(12)}"
    if damage == "sha256":
        data = bytearray(store.read_bytes(f"{prefix}/model.safetensors"))
        data[-5] ^= 0xFF  # same size, different content
        store.write_bytes(f"{prefix}/model.safetensors", bytes(data))
    else:
        store.delete(f"{prefix}/optimizer.pt")
    caplog.clear()

    train_in_process({**settings, "train.max_steps": 12, "train.checkpoint_every_steps": 4}, template)
    out = caplog.text
    reason = "does not match its sha256" if damage == "sha256" else "listed in the manifest but missing"
    assert f"checkpoint {protocol.step_name(12)} is unusable" in out and reason in out
    assert "falling back to the previous one" in out
    assert f"resumed from {protocol.step_name(8)}" in out
    # Step 12 was trained again from step 8 and published over the broken folder: it verifies now,
    # and equals the uninterrupted run.
    assert protocol.complete_steps(store, "rel")[0] == 12
    want = checkpoint_tensors(store, "straight", 12, tmp_path)
    got = checkpoint_tensors(store, "rel", 12, tmp_path)
    assert all((want[k] == got[k]).all() for k in want)


@pytest.mark.parametrize("damage", ["sha256", "missing"])
def test_a_resume_with_no_usable_checkpoint_stops_and_writes_nothing(damage, template, tmp_path, in_process):
    """Every complete checkpoint damaged: the resume raises StorageError naming the newest and its
    problem (exit 1 through the CLI) instead of training again from scratch over them."""
    from trainer.io.storage import StorageError

    bucket = copy_bucket(template, tmp_path / "bucket")
    settings = tiny_settings(template["corpus"], str(bucket), str(tmp_path / "work"))
    store = open_storage(settings["storage.bucket"], make_config(settings).storage)
    train_in_process({**settings, "train.max_steps": 8, "train.checkpoint_every_steps": 4}, template)
    assert protocol.complete_steps(store, "rel")[:2] == [8, 4]
    for step in protocol.complete_steps(store, "rel"):
        prefix = f"{protocol.checkpoints_prefix('rel')}/{protocol.step_name(step)}"
        if damage == "sha256":
            data = bytearray(store.read_bytes(f"{prefix}/model.safetensors"))
            data[-5] ^= 0xFF
            store.write_bytes(f"{prefix}/model.safetensors", bytes(data))
        else:
            store.delete(f"{prefix}/optimizer.pt")
    before = {o.key: store.read_bytes(o.key) for o in store.list(protocol.checkpoints_prefix("rel"))}
    with pytest.raises(StorageError, match=rf"none of the \d+ complete checkpoint\(s\) of run 'rel' verifies "
                                           rf"\(newest, {protocol.step_name(8)}: "):
        train_in_process({**settings, "train.max_steps": 12, "train.checkpoint_every_steps": 4}, template)
    after = {o.key: store.read_bytes(o.key) for o in store.list(protocol.checkpoints_prefix("rel"))}
    assert after == before  # nothing published over the damaged checkpoints


def test_publishing_a_step_again_retracts_its_manifest_and_moves_latest_first(tmp_path):
    store = open_storage(str(tmp_path / "bucket"))
    seen = []

    def staged(step: int, content: bytes):
        d = tmp_path / f"staged-{step}-{content.decode()}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(content)
        protocol.write_manifest(d, step)
        return d

    protocol.publish(store, "r", staged(4, b"four"), 4)
    protocol.publish(store, "r", staged(8, b"old eight"), 8)
    real_upload_file = store.upload_file

    def upload_file(local_path, key):  # the moment the new files start to land
        if not seen:
            seen.append((protocol.complete_steps(store, "r"), store.read_text("runs/r/checkpoints/LATEST")))
        return real_upload_file(local_path, key)

    store.upload_file = upload_file
    protocol.publish(store, "r", staged(8, b"new eight!"), 8)
    assert seen == [([4], "step-00000004")]  # step 8 did not count while its files were replaced
    assert protocol.complete_steps(store, "r") == [8, 4]
    assert store.read_text("runs/r/checkpoints/LATEST") == "step-00000008"
    manifest = json.loads(store.read_text("runs/r/checkpoints/step-00000008/MANIFEST.json"))
    assert manifest["files"]["model.safetensors"]["size"] == len(b"new eight!")
