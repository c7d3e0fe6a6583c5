"""The storage interface, on a local folder and on S3 (moto on loopback): the same tests for both."""

import pytest

from trainer.io.storage import LocalStorage, S3Storage, StorageError, join, open_storage, split_url


def test_backend_matches_the_url(store, bucket):
    assert isinstance(store, S3Storage if bucket.is_s3 else LocalStorage)
    assert store.url("a/b.txt") == join(bucket.url, "a/b.txt")


def test_write_read_exists_delete(store):
    assert not store.exists("a/b.bin")
    store.write_bytes("a/b.bin", b"\x00\x01payload")
    store.write_text("a/c.txt", "床前明月光")
    assert store.exists("a/b.bin") and store.exists("a/c.txt")
    assert store.read_bytes("a/b.bin") == b"\x00\x01payload"
    assert store.read_text("a/c.txt") == "床前明月光"
    assert store.info("a/c.txt").size == len("床前明月光".encode())
    store.write_text("a/c.txt", "replaced")  # overwrite
    assert store.read_text("a/c.txt") == "replaced"
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin") and store.info("a/b.bin") is None
    store.delete("a/b.bin")  # deleting what is gone is fine
    assert store.read_text_or_none("a/b.bin") is None
    with pytest.raises(StorageError, match="not found: .*a/b.bin"):
        store.read_bytes("a/b.bin")
    assert not store.exists("a")  # a "folder" is not an object


def test_list_is_a_string_prefix_as_in_s3(store):
    for key in ("runs/a/x", "runs/a/sub/y", "runs/ab/z", "runsx", "other/w"):
        store.write_text(key, key)
    keys = lambda prefix: [o.key for o in store.list(prefix)]  # noqa: E731
    assert keys("runs/a/") == ["runs/a/sub/y", "runs/a/x"]  # sorted, recursive, relative to the root
    assert keys("runs/a") == ["runs/a/sub/y", "runs/a/x", "runs/ab/z"]
    assert keys("runs") == ["runs/a/sub/y", "runs/a/x", "runs/ab/z", "runsx"]
    assert keys("") == ["other/w", "runs/a/sub/y", "runs/a/x", "runs/ab/z", "runsx"]
    assert keys("nothing/") == [] and keys("runs/a/x") == ["runs/a/x"]
    sizes = {o.key: o.size for o in store.list("runs/")}
    assert sizes["runs/ab/z"] == len("runs/ab/z")
    assert store.delete_prefix("runs/a/") == 2
    assert keys("runs/") == ["runs/ab/z"]


def test_upload_download_round_trip(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    store.upload_file(src, "files/src.bin")
    assert store.info("files/src.bin").size == 256_000
    dest = tmp_path / "deep" / "down" / "copy.bin"
    assert store.download_file("files/src.bin", dest) == 256_000
    assert dest.read_bytes() == src.read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == ["copy.bin"]  # no temporary file left
    with pytest.raises(StorageError, match="not found"):
        store.download_file("files/missing.bin", tmp_path / "missing.bin")
    assert not (tmp_path / "missing.bin").exists()


def test_upload_dir_and_download_dir(store, tmp_path):
    src = tmp_path / "folder"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("bb")
    (src / "MANIFEST.json").write_text("{}")
    keys = store.upload_dir(src, "dir", skip=("MANIFEST.json",))
    assert keys == ["dir/a.txt", "dir/sub/b.txt"]
    out = tmp_path / "out"
    store.download_dir("dir", out)
    assert (out / "a.txt").read_text() == "a" and (out / "sub" / "b.txt").read_text() == "bb"
    assert not (out / "MANIFEST.json").exists()


def test_download_checks_size_and_leaves_no_partial_file(store, tmp_path, monkeypatch):
    store.write_bytes("big.bin", b"x" * 10_000)
    dest = tmp_path / "d" / "big.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"old complete copy")
    real = store._download

    def short_transfer(key, tmp):  # the connection drops: fewer bytes than the object has
        expected = real(key, tmp)
        with open(tmp, "r+b") as f:
            f.truncate(expected // 2)
        return expected

    monkeypatch.setattr(store, "_download", short_transfer)
    with pytest.raises(StorageError, match=r"big\.bin is 5000 bytes, expected 10000"):
        store.download_file("big.bin", dest)
    assert dest.read_bytes() == b"old complete copy"  # the previous file is untouched
    assert [p.name for p in dest.parent.iterdir()] == ["big.bin"]  # and no .part file is left


def test_open_storage_and_split_url(tmp_path):
    local = open_storage(str(tmp_path / "b"))
    assert isinstance(local, LocalStorage) and local.root == str(tmp_path / "b")
    s3 = open_storage("s3://bkt/some/prefix/")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("bkt", "some/prefix")
    assert s3.url("k") == "s3://bkt/some/prefix/k"
    with pytest.raises(StorageError, match="needs a bucket name"):
        open_storage("s3:///x")
    st, key = split_url("s3://bkt/a/b.txt")
    assert (st.bucket, st.prefix, key) == ("bkt", "", "a/b.txt")
    (tmp_path / "f.txt").write_text("hi")
    st, key = split_url(str(tmp_path / "f.txt"))
    assert st.read_text(key) == "hi"


def test_s3_prefixes_are_isolated(new_s3_bucket):
    a, b = new_s3_bucket().open(), new_s3_bucket().open()
    a.write_text("k", "in a")
    assert not b.exists("k") and b.list("") == []
    assert [o.key for o in a.list("")] == ["k"]


def test_s3_errors_name_the_url(s3_endpoint):
    from trainer.config import StorageConfig

    missing = S3Storage("s3://no-such-bucket/p", StorageConfig(endpoint_url=s3_endpoint, retries=2))
    with pytest.raises(StorageError, match="s3://no-such-bucket/p/k"):
        missing.write_text("k", "x")
