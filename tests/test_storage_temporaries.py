"""Storage failures that retrying cannot fix, and what they leave behind (issue 13): a failed copy into a
local bucket (a full disk) leaves no temporary; deleting a step folder removes what a killed writer
left in it; missing S3 credentials and a missing bucket are one-line errors that exit 2, not retried."""

from __future__ import annotations

import errno
import os
import shutil
import time

import pytest

from trainer.config import ConfigError, StorageConfig
from trainer.io.storage import LocalStorage, S3Storage, StorageAccessError, StorageError


def leftovers(root) -> list[str]:
    return sorted(p.name for p in root.rglob("*") if p.is_file() and p.name.endswith(".part"))


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_copy_into_a_local_bucket_leaves_no_temporary(tmp_path, monkeypatch):
    src = tmp_path / "optimizer.pt"
    src.write_bytes(b"x" * 10_000)
    store = LocalStorage(tmp_path / "bucket")
    real_copy = shutil.copyfile

    def copy_then_fill_the_disk(a, b, *args, **kwargs):
        real_copy(a, b)  # the temporary exists, as after a copy that ran out of space part way
        disk_full()

    monkeypatch.setattr(shutil, "copyfile", copy_then_fill_the_disk)
    with pytest.raises(StorageError, match=r"write .*bucket/runs/r/step-8/optimizer\.pt failed: .*No space left"):
        store.upload_file(src, "runs/r/step-8/optimizer.pt")
    assert leftovers(tmp_path / "bucket") == [] and not store.exists("runs/r/step-8/optimizer.pt")


def test_a_missing_source_file_is_not_a_storage_error(tmp_path):
    store = LocalStorage(tmp_path / "bucket")
    with pytest.raises(FileNotFoundError):  # the caller's mistake, not the bucket's: no "write ... failed"
        store.upload_file(tmp_path / "nowhere.bin", "a/b.bin")
    assert leftovers(tmp_path / "bucket") == []


def test_a_failed_write_into_a_local_bucket_leaves_no_temporary(tmp_path, monkeypatch):
    store = LocalStorage(tmp_path / "bucket")
    store.write_text("runs/r/LATEST", "step-4")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StorageError, match=r"write .*runs/r/LATEST failed"):
        store.write_text("runs/r/LATEST", "step-8")
    assert leftovers(tmp_path / "bucket") == [] and store.read_text("runs/r/LATEST") == "step-4"  # old one intact


def test_a_signal_during_a_local_write_leaves_no_temporary(tmp_path, monkeypatch):
    store = LocalStorage(tmp_path / "bucket")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.write_bytes("a/b.bin", b"data")
    assert leftovers(tmp_path / "bucket") == []


def test_deleting_a_step_folder_removes_a_killed_writers_temporaries_and_the_folder(tmp_path):
    store = LocalStorage(tmp_path / "bucket")
    store.write_bytes("runs/r/step-8/model.safetensors", b"m")
    store.write_bytes("runs/r/step-8/sub/state.json", b"{}")
    store.write_bytes("runs/r/step-12/model.safetensors", b"m")
    (tmp_path / "bucket/runs/r/step-8/.optimizer.pt.4242.139.part").write_bytes(b"half")  # a kill -9 mid-copy
    assert store.delete_prefix("runs/r/step-8/") == 2
    assert not (tmp_path / "bucket/runs/r/step-8").exists()
    assert store.exists("runs/r/step-12/model.safetensors")  # the neighbour is untouched


def no_credentials(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup


def test_missing_s3_credentials_are_a_one_line_config_error(s3_endpoint, monkeypatch):
    no_credentials(monkeypatch)
    store = S3Storage("s3://zh-pretrain-tests/x", StorageConfig(endpoint_url=s3_endpoint, retries=5))
    start = time.time()
    with pytest.raises(StorageAccessError) as e:
        store.read_text("runs/r/LATEST")
    assert time.time() - start < 5  # not retried with backoff
    assert isinstance(e.value, ConfigError) and isinstance(e.value, StorageError)
    msg = str(e.value)
    assert "\n" not in msg and "s3://zh-pretrain-tests/x/runs/r/LATEST" in msg and "no S3 credentials" in msg


def test_missing_credentials_or_bucket_exit_2_from_the_cli(s3_endpoint, tmp_path, monkeypatch, capsys):
    import entrypoint

    common = [f"--storage.bucket={tmp_path / 'bucket'}", f"--storage.local_dir={tmp_path / 'work'}",
              f"--storage.endpoint_url={s3_endpoint}"]
    with pytest.raises(SystemExit) as e:  # a bucket that does not exist (credentials are fine)
        entrypoint.main(["pull", "--data.sources=s3://no-such-bucket-zh/corpus/"] + common)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no such bucket (storage.bucket)" in err and "Traceback" not in err
    no_credentials(monkeypatch)
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["pull", "--data.sources=s3://zh-pretrain-tests/corpus/"] + common)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no S3 credentials" in err and len(err.strip().splitlines()) == 1
