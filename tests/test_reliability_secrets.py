"""Credentials never leave boto3: a whole job against the loopback S3 server with distinctive
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, some of its requests answered by an error that echoes
the request's Authorization header; then every output is searched for them: stdout and stderr,
every object in the bucket (config, metrics, checkpoints, tokenizer, shards, export) and every file
under storage.local_dir. And a storage error that carries them is reported without them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from faults import (
    FaultProxy,
    cli_args,
    make_config,
    run,
    s3_prefix,
    s3_server,
    subprocess_env,
    template,
    tiny_settings,  # noqa: F401
    write_config,
)
from trainer.io.storage import StorageError, open_storage, redact

KEY_ID = "AKIARELIABILITYQ7Z3X"
SECRET = "rel/Secret+Zq81xv0Kp3mN4bT7wY2cL9dF6gH5jS8aE1uR"
CREDS = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}


def leaks(data: bytes) -> list[str]:
    return [s for s in (KEY_ID, SECRET) if s.encode() in data]


def test_no_output_of_a_job_contains_the_credentials(template, s3_server, tmp_path, monkeypatch):
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    rules = [(r"PUT .*/tokenizers/", "echo", 2), (r"GET .*/data/", "echo", 2), (r"PUT .*/checkpoints/", "echo", 2)]
    with FaultProxy(s3_server, rules=rules) as proxy:
        root = s3_prefix()
        settings = tiny_settings(template["corpus"], root, str(tmp_path / "work"), proxy.url,
                                 **{"train.max_steps": 8, "storage.retries": 4})
        config = write_config(tmp_path / "c.yaml", settings)
        result = run(cli_args("run", f"--config={config}"), env=subprocess_env(**CREDS), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert proxy.injected["echo"] == 6
    assert not leaks(result.stdout.encode())
    store = open_storage(root, make_config({**settings, "storage.endpoint_url": s3_server}).storage)
    objects = store.list("")
    assert any(o.key.endswith("model.safetensors") for o in objects) and any(o.key == "runs/rel/config.yaml"
                                                                          for o in objects)
    for o in objects:
        assert not leaks(store.read_bytes(o.key)), o.key
    files = [p for p in Path(tmp_path / "work").rglob("*") if p.is_file()]
    assert len(files) > 10
    for p in files:
        assert not leaks(p.read_bytes()), p


def test_storage_errors_carry_no_credentials(s3_server, tmp_path, monkeypatch):
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    with FaultProxy(s3_server, rate=1.0, kinds=("echo",)) as proxy:
        settings = tiny_settings("x", s3_prefix(), str(tmp_path / "work"), proxy.url, **{"storage.retries": 1})
        store = open_storage(settings["storage.bucket"], make_config(settings).storage)
        with pytest.raises(StorageError) as e:
            store.read_text("runs/rel/config.yaml")
        # Through the CLI too: the error line of a failed stage.
        source = f"{settings['storage.bucket']}/*.jsonl"
        config = write_config(tmp_path / "c.yaml", {**settings, "data.sources": [source]})
        result = run(cli_args("pull", f"--config={config}"), env=subprocess_env(**CREDS), timeout=120)
    assert "Authorization: AWS4-HMAC-SHA256 Credential=***" in str(e.value)  # the echo, redacted
    assert not leaks(str(e.value).encode())
    assert result.returncode == 1 and re.search(r"error: storage: (list|stat) s3://", result.stdout), \
        result.stdout[-3000:]
    assert not leaks(result.stdout.encode())


def test_redact():
    text = f"id {KEY_ID} secret {SECRET} url ?X-Amz-Credential={KEY_ID}%2F20260101&X-Amz-Signature=abc123 " \
           f"header Credential={KEY_ID}/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=def456"
    with pytest.MonkeyPatch.context() as m:
        for k, v in CREDS.items():
            m.setenv(k, v)
        out = redact(text)
    assert not leaks(out.encode()) and "abc123" not in out and "def456" not in out and "SignedHeaders=host" in out
