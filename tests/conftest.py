"""Shared fixtures: an S3 server on loopback (moto), a `store` on both backends, a tiny corpus and
a tiny config, and a helper that runs `entrypoint.py` in a subprocess.

Storage, pull, prepare and checkpoint tests take `store` (or `bucket`) and so run twice: against a
local folder and against s3://<bucket>/<unique prefix> on the moto server.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from faults import in_process  # noqa: F401  (a fixture: single_process uses it)
from trainer.config import Config, StorageConfig, load_config
from trainer.io.storage import Storage, open_storage

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "poetry-sample-00.jsonl.zst"
TINY_DOCS = 300  # poems in the tiny corpus: ~40k tokens at vocab 512, ~1200 samples of 32 tokens
S3_BUCKET = "zh-pretrain-tests"


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped on machines without CUDA."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


# S3 on loopback ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server in a thread on 127.0.0.1 (a free port), with one bucket (faults.moto_s3, the
    one place a server starts). Test credentials are set in the environment for the whole session
    (boto3 and subprocesses read them there)."""
    from faults import moto_s3

    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "test-access-key")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-do-not-log")
    mp.setenv("AWS_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_CONFIG_FILE", os.devnull)  # no ~/.aws settings leak into the tests
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    with moto_s3(S3_BUCKET) as endpoint:
        yield endpoint
    mp.undo()


@dataclass(frozen=True)
class Bucket:
    """Where a test's outputs go: a local folder or s3://bucket/prefix on the moto server."""
    url: str
    endpoint_url: str = ""  # empty for a local folder

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    def storage_config(self) -> StorageConfig:
        return StorageConfig(bucket=self.url, endpoint_url=self.endpoint_url, max_concurrency=4, retries=2)

    def open(self) -> Storage:
        return open_storage(self.url, self.storage_config())

    def overrides(self) -> dict:
        return {"storage.bucket": self.url, "storage.endpoint_url": self.endpoint_url}


def s3_bucket(endpoint: str) -> Bucket:
    return Bucket(f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}", endpoint)


@pytest.fixture
def new_s3_bucket(s3_endpoint):
    """A function giving a fresh s3://bucket/<unique prefix> on the moto server at each call."""
    return lambda: s3_bucket(s3_endpoint)


@pytest.fixture(params=["local", "s3"])
def bucket(request, tmp_path) -> Bucket:
    if request.param == "local":
        return Bucket(str(tmp_path / "bucket"))
    return s3_bucket(request.getfixturevalue("s3_endpoint"))


@pytest.fixture
def store(bucket) -> Storage:
    return bucket.open()


# A tiny corpus and a tiny config ----------------------------------------------------------------

def read_sample_docs(n: int) -> list[str]:
    import zstandard

    with open(SAMPLE, "rb") as f:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        docs = []
        for line in lines:
            docs.append(json.loads(line)["text"])
            if len(docs) == n:
                return docs
    return docs


@pytest.fixture(scope="session")
def tiny_docs() -> list[str]:
    """The first few hundred poems of the bundled sample."""
    return read_sample_docs(TINY_DOCS)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, tiny_docs) -> Path:
    """tiny_docs as one jsonl file."""
    path = tmp_path_factory.mktemp("corpus") / "poems.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in tiny_docs), encoding="utf-8")
    return path


TINY = {
    "run.id": "tiny",
    "data.val_permille": 50,  # ~15 of 300 poems, enough for a validation loss
    "data.shard_tokens": 4096,  # several shards from a tiny corpus
    "tokenizer.vocab_size": 512,
    "tokenizer.sample_bytes": 200_000,
    "model.preset": "tiny",
    "train.max_steps": 8,
    "train.seq_len": 32,
    "train.batch_tokens": 256,  # 8 sequences per step
    "train.micro_batch_size": 2,  # gradient accumulation: 4 micro-steps on 1 process, 2 on 2
    "train.lr": 0.003,
    "train.warmup_steps": 2,
    "train.checkpoint_every_steps": 4,
    "train.eval_every_steps": 4,
    "train.eval_sequences": 4,
    "train.log_every_steps": 1,
    "train.device": "cpu",
    "train.compile": "off",
    "sample.max_new_tokens": 8,
}


@pytest.fixture(scope="session")
def tiny_config(tiny_corpus):
    """make(root, overrides={}, bucket=None) -> Config: the tiny model on the tiny corpus, with
    the bucket (default root/bucket) and scratch (root/work) under `root`."""

    def make(root: Path, overrides: dict | None = None, bucket: Bucket | None = None) -> Config:
        bucket = bucket or Bucket(str(Path(root) / "bucket"))
        values = {**TINY, "data.sources": [str(tiny_corpus)], "storage.local_dir": str(Path(root) / "work"),
                  **bucket.overrides(), **(overrides or {})}
        return load_config(None, values, env={})

    return make


# Running the CLI --------------------------------------------------------------------------------

SIGTERM_AFTER_CHECKPOINT_HOOK = '''
# Test hook (Cli.sigterm_after_checkpoint_env): rank 0 receives SIGTERM right after publishing a checkpoint.
import os
if os.environ.get("TEST_SIGTERM_AFTER_CHECKPOINT"):
    import signal
    import trainer.state.protocol as _protocol
    _step, _publish = int(os.environ["TEST_SIGTERM_AFTER_CHECKPOINT"]), _protocol.publish
    def _publish_then_sigterm(store, run_id, local_dir, step):
        url = _publish(store, run_id, local_dir, step)
        if step == _step:
            os.kill(os.getpid(), signal.SIGTERM)
        return url
    _protocol.publish = _publish_then_sigterm
'''


class Cli:
    """Runs `entrypoint.py <command> --config=... --key=value ...` in subprocesses."""

    @staticmethod
    def env(**extra: str) -> dict:
        """One thread per process (2 shared cores), no distributed or config variables inherited."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
                            "NPROC", "CONFIG", "RUN_ID", "BUCKET", "LOCAL_DIR", "AWS_ENDPOINT_URL")}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **extra)
        return env

    @staticmethod
    def args(command: str, config_path: Path, overrides: dict | None = None) -> list[str]:
        args = [sys.executable, str(ROOT / "entrypoint.py"), command, f"--config={config_path}"]
        return args + [f"--{k}={v}" for k, v in (overrides or {}).items()]

    def run(self, command: str, config_path: Path, overrides: dict | None = None, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run to the end; stdout and stderr together in .stdout."""
        return subprocess.run(self.args(command, config_path, overrides), cwd=ROOT, env=env or self.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def start(self, command: str, config_path: Path, overrides: dict | None = None, log: Path | None = None,
              env: dict | None = None) -> subprocess.Popen:
        """Start in a session of its own (so kill() can take the whole tree), output to `log`."""
        out = open(log, "w") if log else subprocess.DEVNULL
        return subprocess.Popen(self.args(command, config_path, overrides), cwd=ROOT, env=env or self.env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the process, its process group and every descendant, as when the machine is lost."""
        from trainer.training.launch import kill_tree

        kill_tree(proc)

    def kill_after_a_checkpoint(self, config_path: Path, overrides: dict, log: Path, store, run_id: str) -> list[int]:
        """Start `pretrain`, SIGKILL its whole tree as soon as LATEST appears (a checkpoint is
        published); return the complete steps left in the bucket, newest first."""
        from trainer.state import protocol
        proc = self.start("pretrain", config_path, overrides, log=log)
        latest = f"{protocol.checkpoints_prefix(run_id)}/{protocol.LATEST}"
        try:
            deadline = time.time() + 240
            while not store.exists(latest):
                assert proc.poll() is None, f"exited {proc.returncode} before a checkpoint:\n{log.read_text()[-4000:]}"
                assert time.time() < deadline, log.read_text()[-4000:]
                time.sleep(0.01)
        finally:
            self.kill(proc)
        return protocol.complete_steps(store, run_id)

    def sigterm_after_checkpoint_env(self, step: int, tmp_path: Path) -> dict:
        """env() for a CLI run whose rank 0 gets SIGTERM right after publishing checkpoint `step`
        (a sitecustomize.py hook on PYTHONPATH, so torchrun's workers load it too)."""
        hook = tmp_path / "hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(SIGTERM_AFTER_CHECKPOINT_HOOK)
        path = [str(hook)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return self.env(TEST_SIGTERM_AFTER_CHECKPOINT=str(step), PYTHONPATH=os.pathsep.join(path))

    @staticmethod
    def write_config(cfg: Config, path: Path) -> Path:
        from trainer.config import to_yaml

        path.write_text(to_yaml(cfg), encoding="utf-8")
        return path


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


def read_metrics(store: Storage, run_id: str) -> list[dict]:
    text = store.read_text(f"runs/{run_id}/metrics.jsonl")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def metrics():
    """metrics(store, run_id) -> the rows of runs/<run_id>/metrics.jsonl."""
    return read_metrics


@pytest.fixture
def single_process(in_process):
    """In-process training as one process on CPU with one thread (as the subprocesses run):
    faults.in_process, the one in-process runner's setup."""
    yield
