"""Retries in one layer, bounded (issue 23): storage.retries is the number of attempts per S3 request."""

import pytest

from trainer.io.storage import StorageError


@pytest.mark.parametrize("retries", [1, 3])
def test_a_dead_endpoint_fails_after_exactly_the_configured_attempts(retries, monkeypatch):
    """One retry layer (issue 23): botocore's standard mode retries a refused connection storage.retries
    times in all and our own loop adds none (it once made retries x retries attempts)."""
    import socket

    from trainer.config import StorageConfig
    from trainer.io.storage import S3Storage

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    store = S3Storage("s3://b/p", StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", retries=retries,
                                                timeout_seconds=2))
    sent = []
    store.client.meta.events.register("before-send.s3", lambda **kw: sent.append(kw["request"].method))
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # our backoff, if any, takes no time here
    for op in (lambda: store.read_bytes("x"), lambda: store.write_bytes("x", b"1"), lambda: store.exists("x")):
        sent.clear()
        with pytest.raises(StorageError, match=rf"failed after {retries} attempt\(s\) \(storage.retries={retries}\)"):
            op()
        assert len(sent) == retries
