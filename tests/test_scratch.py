"""Scratch space belongs to one job (issue 23): a local_dir shared by two buckets' runs of the same
run.id, or a bucket and local_dir that overlap, are refused before anything is written (exit 2)."""

import pytest

import entrypoint
from trainer.config import ConfigError, StorageConfig
from trainer.io.scratch import OWNER_FILE, check_scratch_apart, claim_scratch


def test_two_buckets_sharing_local_dir_for_one_run_id(tmp_path):
    work = tmp_path / "work"
    a = StorageConfig(bucket=str(tmp_path / "a"), local_dir=str(work))
    b = StorageConfig(bucket="s3://other/prefix", local_dir=str(work))
    claim_scratch(a, "r")
    claim_scratch(a, "r")  # the same job again (a rerun): fine
    with pytest.raises(ConfigError, match=r"storage.local_dir .* holds run 'r' of another bucket .*/a\)"):
        claim_scratch(b, "r")
    claim_scratch(b, "another-run")  # other run ids share the folder without harm
    assert (work / "runs" / "r" / OWNER_FILE).is_file()


@pytest.mark.parametrize("bucket, local_dir, where", [
    ("x", "x", "the same folder"), ("x/bucket", "x", "inside storage.local_dir"), ("x", "x/work", "holding"),
])
def test_overlapping_bucket_and_scratch_are_refused(tmp_path, bucket, local_dir, where):
    s = StorageConfig(bucket=str(tmp_path / bucket), local_dir=str(tmp_path / local_dir))
    with pytest.raises(ConfigError, match=where):
        check_scratch_apart(s)


def test_apart_is_fine(tmp_path):
    check_scratch_apart(StorageConfig(bucket=str(tmp_path / "bucket"), local_dir=str(tmp_path / "work")))
    check_scratch_apart(StorageConfig(bucket="s3://b/p", local_dir=str(tmp_path / "work")))


def test_export_with_the_bucket_as_local_dir_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    for name in ("CONFIG", "RUN_ID", "BUCKET", "LOCAL_DIR"):
        monkeypatch.delenv(name, raising=False)
    same = tmp_path / "same"
    same.mkdir()
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["export", f"--storage.bucket={same}", f"--storage.local_dir={same}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: storage.bucket" in err and "the same folder" in err
    assert list(same.iterdir()) == []
