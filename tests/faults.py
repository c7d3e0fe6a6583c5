"""Fault injection for the reliability tests (tests/test_reliability_*.py). Test-only: nothing in
trainer/ imports this.

- `moto_s3()`: an S3 server (moto) on loopback with one bucket.
- `FaultProxy`: an HTTP proxy on loopback in front of it that answers a fraction of the requests
  (optionally only those matching a pattern, or the first n of a pattern) with 500 or 503, resets
  the connection, stalls, cuts a response body short, or echoes the Authorization header in an
  error, and counts what it did.
- `python tests/faults.py kill-at POINT N -- <entrypoint.py args | -m trainer.training.worker ...>`: runs
  the CLI (or one training process) in this process and SIGKILLs it the Nth time it reaches POINT
  (while staging a checkpoint, after one checkpoint file is uploaded, between the manifest and
  LATEST, inside an optimizer step): a kill -9 at an exact moment, which random delays only hit
  by luck. `Zygote` does the same for forked processes.
- Fixtures (`template`, `s3_server`, `in_process`) and helpers: a tiny corpus, its prepared
  tokenizer and shards, configs, subprocess environment, bucket invariants, weights.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "poetry-sample-00.jsonl.zst"
S3_BUCKET = "reliability"
# Credentials for the loopback S3 server (moto accepts any); no ~/.aws settings leak into the tests.
S3_ENV = {"AWS_ACCESS_KEY_ID": "reliability-test-key", "AWS_SECRET_ACCESS_KEY": "reliability-test-secret",
          "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


# S3 on loopback --------------------------------------------------------------------------------

@contextlib.contextmanager
def moto_s3(bucket: str = S3_BUCKET):
    """Yields the endpoint URL of a moto S3 server on 127.0.0.1 holding an empty `bucket`.
    moto accepts any credentials; the caller puts some in the environment."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="x").create_bucket(Bucket=bucket)
    try:
        yield endpoint
    finally:
        server.stop()


_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "upgrade", "te"}


class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of `upstream` that injects faults.

    Each request ("METHOD /path?query") that matches `match` (a regex; None = all) fails with
    probability `rate`; the kind is drawn from `kinds`:
      500, 503  an S3 error response (InternalError, SlowDown), the request not forwarded;
      reset     the connection reset (RST) after the request was read, not forwarded;
      stall     `stall_seconds` of silence, then forwarded (slow, or a client timeout);
      cut       forwarded, then the response body cut off half way and the connection reset;
      echo      a 503 whose message repeats the request's Authorization header (the access key id
                and signature), as some S3-compatible servers' signature errors do.
    `rules` [(regex, kind, n)] fail the first n requests matching regex with `kind`, whatever the
    rate (so that each phase of a job is sure to meet a fault). `injected` counts faults by kind,
    `requests` counts requests by method, `log` lists (request, kind) of every fault.
    """

    def __init__(self, upstream: str, rate: float = 0.0, kinds=("500", "503", "reset"), match: str | None = None,
                 stall_seconds: float = 2.0, seed: int = 0, rules=()):
        self.upstream = urlsplit(upstream)
        self.rules = [[re.compile(rx), kind, n] for rx, kind, n in rules]
        self.configure(rate=rate, kinds=kinds, match=match, stall_seconds=stall_seconds)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected: Counter = Counter()
        self.requests: Counter = Counter()
        self.log: list[tuple[str, str]] = []  # (request, fault) for every injected fault
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self
        self._server.handle_error = lambda request, address: None  # resets are the point
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def configure(self, rate: float | None = None, kinds=None, match: str | None = "", stall_seconds=None):
        if rate is not None:
            self.rate = rate
        if kinds is not None:
            self.kinds = tuple(kinds)
        if match != "":
            self.match = re.compile(match) if match else None
        if stall_seconds is not None:
            self.stall_seconds = stall_seconds

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def pick(self, what: str) -> str | None:
        with self._lock:
            self.requests[what.split(" ", 1)[0]] += 1
            for rule in self.rules:
                if rule[2] > 0 and rule[0].search(what):
                    rule[2] -= 1
                    self.injected[rule[1]] += 1
                    self.log.append((what, rule[1]))
                    return rule[1]
            if self.rate <= 0 or (self.match is not None and not self.match.search(what)):
                return None
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(self.kinds)
            self.injected[kind] += 1
            self.log.append((what, kind))
            return kind

    def forward(self, method: str, path: str, headers, body: bytes):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            conn.request(method, path, body=body or None,
                         headers={k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP})
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects

    def log_message(self, *args):
        pass

    def _send_xml(self, status: int, data: bytes):
        """An S3-style XML error reply (HEAD gets the status alone, as S3 sends it)."""
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _reset(self):
        """Close with SO_LINGER 0: the client sees a connection reset, not a clean close."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        self.close_connection = True

    def _any(self):
        proxy: FaultProxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fault = proxy.pick(f"{self.command} {self.path}")
        if fault in _ERRORS:
            status, code, message = _ERRORS[fault]
            data = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
                    f"<RequestId>fault-proxy</RequestId></Error>").encode()
            return self._send_xml(status, data)
        if fault == "echo":
            auth = self.headers.get("Authorization", "")
            key_id = re.search(r"Credential=([^/]+)/", auth)
            data = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Slow down; '
                    f"request {self.command} {self.path} Authorization: {auth}</Message>"
                    f"<AWSAccessKeyId>{key_id.group(1) if key_id else ''}</AWSAccessKeyId></Error>").encode()
            return self._send_xml(503, data)
        if fault == "reset":
            return self._reset()
        if fault == "stall":
            time.sleep(proxy.stall_seconds)
        try:
            status, headers, data = proxy.forward(self.command, self.path, self.headers, body)
        except OSError:
            return self._reset()
        self.send_response_only(status)
        for k, v in headers:
            if k.lower() not in _HOP_BY_HOP and not (k.lower() == "content-length" and self.command != "HEAD"):
                self.send_header(k, v)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if fault == "cut" and self.command == "GET" and len(data) > 1:
            with contextlib.suppress(OSError):
                self.wfile.write(data[: len(data) // 2])
            return self._reset()
        if self.command != "HEAD":
            with contextlib.suppress(OSError):
                self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

    def finish(self):
        with contextlib.suppress(OSError):
            super().finish()


# Killing at an exact point ---------------------------------------------------------------------

KILL_POINTS = ("staging", "upload", "before-latest", "optimizer-step")


def _install_kill(point: str, nth: int) -> None:
    """Patch the trainer so this process SIGKILLs itself the nth time it reaches `point`."""
    from trainer.io.storage import LocalStorage, S3Storage
    from trainer.state import checkpoint as ckpt
    from trainer.state import protocol

    count = Counter()

    def reached(what: str) -> None:
        count[what] += 1
        if count[what] == nth:
            print(f"[faults] kill -9 at {what} #{nth}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "staging":  # checkpoint files written locally, its manifest not yet
        real_manifest = ckpt.write_manifest

        def write_manifest(local_dir, step):
            if "staged" in str(local_dir):
                reached(point)
            return real_manifest(local_dir, step)

        ckpt.write_manifest = write_manifest
    elif point in ("upload", "before-latest"):
        for cls in (LocalStorage, S3Storage):
            real_upload, real_write = cls.upload_file, cls.write_bytes

            def upload_file(self, local_path, key, _real=real_upload):
                _real(self, local_path, key)
                if point == "upload" and "/checkpoints/step-" in key and not key.endswith(protocol.MANIFEST):
                    reached(point)  # one file of the checkpoint is in the bucket, the rest is not

            def write_bytes(self, key, data, _real=real_write):
                if point == "before-latest" and key.endswith("/" + protocol.LATEST):
                    reached(point)  # the manifest is published, LATEST not yet
                return _real(self, key, data)

            cls.upload_file, cls.write_bytes = upload_file, write_bytes
    elif point == "optimizer-step":  # gradients computed, the update half applied at most
        import torch

        real_step = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            reached(point)
            return real_step(self, *args, **kwargs)

        torch.optim.AdamW.step = step
    else:
        raise ValueError(f"unknown kill point {point!r}; one of {KILL_POINTS}")


def _main(argv: list[str]) -> None:
    sys.path.insert(0, str(ROOT))
    if argv[:1] == ["zygote"]:
        return _zygote()
    if len(argv) < 4 or argv[0] != "kill-at" or argv[3] != "--":
        raise SystemExit("usage: python tests/faults.py kill-at POINT N -- <entrypoint.py args> | zygote")
    _install_kill(argv[1], int(argv[2]))
    job_main(argv[4:])


def job_main(args: list[str]) -> None:
    """Run a job process's arguments in this process: `-m trainer.training.worker ...` as
    `python -m trainer.training.worker ...` would (one training process), anything else as
    `entrypoint.py ...`."""
    if args[:2] == ["-m", "trainer.training.worker"]:
        from trainer.training import worker

        return worker.main(args[2:])
    import entrypoint

    entrypoint.main(args)


# A zygote: job processes forked from one that has imported everything -----------------------------
# A fresh `python -m trainer.training.worker` spends 4-8 s (on 2 busy cores) importing torch and transformers
# before its first step. The kill tests start a dozen processes, so they fork them from a process
# that did those imports once. Each child is still a whole job process with its own pid and
# session, killed with a real SIGKILL; only the imports are shared (no threads run at the fork).

def _zygote() -> None:
    import safetensors.torch  # noqa: F401
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401 - transformers imports models lazily

    import entrypoint  # noqa: F401 - imported for the children
    import trainer.job.run  # noqa: F401
    import trainer.training.worker  # noqa: F401

    torch.set_num_threads(1)
    reply = sys.stdout
    print(json.dumps({"ready": True}), file=reply, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "wait":
            _, status = os.waitpid(req["pid"], 0)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            print(json.dumps({"returncode": code}), file=reply, flush=True)
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # exists when spawn returns
        pid = os.fork()
        if pid == 0:  # the child: a job process
            code = 1
            try:
                os.setsid()
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.environ.update(req.get("env", {}))
                if req.get("kill"):
                    _install_kill(*req["kill"])
                job_main(req["args"])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:  # noqa: BLE001 - reported in the log, as the interpreter would
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(fd)
        print(json.dumps({"pid": pid}), file=reply, flush=True)


class Zygote:
    """Client of `python tests/faults.py zygote`: spawn(args, log) -> pid; wait(pid) -> return code."""

    def __init__(self, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "zygote"], cwd=ROOT,
                                     env=env or subprocess_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def spawn(self, args: list[str], log: Path, kill: tuple[str, int] | None = None, env: dict | None = None) -> int:
        return self._ask({"cmd": "spawn", "args": args, "log": str(log), "kill": kill, "env": env or {}})["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"cmd": "wait", "pid": pid})["returncode"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# Helpers for the tests ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def template(tmp_path_factory) -> dict:
    """prepared_template() under the session's temporary folder (made by the first test that asks)."""
    return prepared_template(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on loopback for one test module; test credentials in the environment."""
    mp = pytest.MonkeyPatch()
    for k, v in S3_ENV.items():
        mp.setenv(k, v)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(name, raising=False)
    with moto_s3() as endpoint:
        yield endpoint
    mp.undo()


def s3_prefix() -> str:
    """A fresh s3://bucket/prefix on the s3_server."""
    import uuid

    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:10]}"


def write_corpus(path: Path, n_docs: int = 300) -> Path:
    """The first n_docs poems of the bundled sample as one jsonl file."""
    import io

    import zstandard

    with open(SAMPLE, "rb") as f:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        docs = [json.loads(line)["text"] for _, line in zip(range(n_docs), lines)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs), encoding="utf-8")
    return path


def tiny_settings(corpus: str, bucket: str, local_dir: str, endpoint: str = "", **overrides) -> dict:
    """Dotted-key settings of a tiny job: 2-layer model, 8 x 32 tokens per step, 4 micro-batches."""
    values = {
        "run.id": "rel", "run.lease_seconds": 10,
        "storage.bucket": bucket, "storage.local_dir": local_dir, "storage.endpoint_url": endpoint,
        "storage.retries": 3, "storage.max_concurrency": 2,
        "data.sources": [corpus], "data.val_permille": 50, "data.shard_tokens": 4096,
        "tokenizer.vocab_size": 512, "tokenizer.sample_bytes": 200_000,
        "model.preset": "tiny",
        "train.max_steps": 24, "train.seq_len": 32, "train.batch_tokens": 256, "train.micro_batch_size": 2,
        "train.lr": 0.003, "train.warmup_steps": 2, "train.checkpoint_every_steps": 4,
        "train.eval_every_steps": 0, "train.eval_sequences": 2, "train.log_every_steps": 4,
        "train.device": "cpu", "train.compile": "off", "sample.max_new_tokens": 4, "sample.prompts": ["床前"],
    }
    values.update(overrides)
    return values


def prepared_template(base: Path) -> dict:
    """The tiny corpus, and a bucket folder holding its tokenizer and shards, made once per test
    session under base/template (every test copies the bucket): {"corpus", "bucket",
    "tokenizer_key", "data_key"}."""
    root = Path(base) / "template"
    info = root / "template.json"
    if info.is_file():
        return json.loads(info.read_text())
    from trainer.job.stages import stage_prepare

    corpus = write_corpus(root / "corpus" / "poems.jsonl")
    arts = stage_prepare(make_config(tiny_settings(str(corpus), str(root / "bucket"), str(root / "work"))))
    out = {"corpus": str(corpus), "bucket": str(root / "bucket"), "tokenizer_key": arts.tokenizer_key,
           "data_key": arts.data_key}
    info.write_text(json.dumps(out))
    return out


def copy_bucket(template: dict, dest: Path) -> Path:
    import shutil

    shutil.copytree(template["bucket"], dest)
    return dest


def upload_bucket(template: dict, store) -> None:
    """The template's tokenizer and shards into another store (an s3:// prefix)."""
    for key in (template["tokenizer_key"], template["data_key"]):
        store.upload_dir(Path(template["bucket"]) / key, key)


def worker_args(config: Path, template: dict, where: Path) -> list[str]:
    """`python -m trainer.training.worker` arguments (after `python`): one training process, as
    torchrun would start it; Zygote.spawn and `faults.py kill-at` run them (job_main)."""
    arts = where / "artifacts.json"
    arts.write_text(json.dumps({"tokenizer_key": template["tokenizer_key"], "data_key": template["data_key"]}))
    return ["-m", "trainer.training.worker", "--stage=pretrain", f"--config={config}", f"--artifacts={arts}"]


@pytest.fixture
def in_process(monkeypatch):
    """For train() in the test process: one process on CPU, one thread; pytest's signal handlers
    put back afterwards (train() installs its own for SIGTERM/SIGINT)."""
    import torch

    for name in _INHERITED_NOT:
        monkeypatch.delenv(name, raising=False)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for s, h in saved.items():
        signal.signal(s, h)


def train_in_process(settings: dict, template: dict) -> dict:
    """One training process (worker.pretrain_worker) in this process, on the template's tokenizer and shards."""
    from trainer.io.artifacts import Artifacts
    from trainer.training.worker import pretrain_worker as worker

    return worker(make_config(settings), Artifacts(template["tokenizer_key"], template["data_key"]))


def make_config(settings: dict):
    from trainer.config import load_config

    return load_config(None, settings, env={})


def write_config(path: Path, settings: dict) -> Path:
    from trainer.config import to_yaml

    path.write_text(to_yaml(make_config(settings)), encoding="utf-8")
    return path


_INHERITED_NOT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NNODES",
                  "NODE_RANK", "GROUP_RANK", "NPROC", "CONFIG", "RUN_ID", "BUCKET", "LOCAL_DIR", "AWS_ENDPOINT_URL",
                  "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "TORCHELASTIC_RUN_ID")


def subprocess_env(**extra: str) -> dict:
    """The environment for a CLI subprocess: one thread, nothing distributed or config-like inherited."""
    env = {k: v for k, v in os.environ.items() if k not in _INHERITED_NOT}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def cli_args(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "entrypoint.py"), *args]


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a command in a session of its own, stdout and stderr to `log`."""
    return subprocess.Popen(args, cwd=ROOT, env=env or subprocess_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def run(args: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=env or subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def pid_alive(pid: int) -> bool:
    """Running (not exited, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for_line(log: Path, pattern: str, proc: subprocess.Popen | int, timeout: float = 120,
                  count: int = 1) -> bool:
    """True once `pattern` (a regex) appears `count` times in the log; False if the process (a
    Popen or a pid) exits first."""
    rx = re.compile(pattern)
    alive = (lambda: proc.poll() is None) if isinstance(proc, subprocess.Popen) else (lambda: pid_alive(proc))
    seen = lambda: len(rx.findall(log.read_text(errors="replace"))) >= count  # noqa: E731
    deadline = time.time() + timeout
    while time.time() < deadline:
        if seen():
            return True
        if not alive():
            return seen()
        time.sleep(0.01)
    raise TimeoutError(f"{pattern!r} not in {log} after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def verified_steps(store, run_id: str, scratch: Path) -> list[int]:
    """Complete checkpoints (with a manifest) whose every file matches it, newest first."""
    from trainer.io.storage import StorageError
    from trainer.state import protocol

    good = []
    for step in protocol.complete_steps(store, run_id):
        try:
            protocol.fetch_verified(store, run_id, step, scratch / protocol.step_name(step))
            good.append(step)
        except StorageError:
            pass
    return good


def assert_bucket_consistent(store, run_id: str, scratch: Path) -> int | None:
    """Every complete checkpoint verifies and LATEST (if present) names one of them; returns the
    newest complete step (None when there is none)."""
    from trainer.state import protocol
    complete = protocol.complete_steps(store, run_id)
    good = verified_steps(store, run_id, scratch)
    assert good == complete, f"complete checkpoints {complete} but only {good} verify"
    latest = store.read_text_or_none(f"{protocol.checkpoints_prefix(run_id)}/{protocol.LATEST}")
    if latest is not None:
        assert int(latest.strip()[len("step-"):]) in complete, f"LATEST names {latest!r}, complete: {complete}"
    return complete[0] if complete else None


def checkpoint_tensors(store, run_id: str, step: int, scratch: Path) -> dict:
    from safetensors.torch import load_file

    from trainer.state import protocol
    dest = protocol.fetch_verified(store, run_id, step, scratch / f"weights-{run_id}-{step}")
    return load_file(str(dest / "model.safetensors"))


def losses(store, run_id: str) -> dict[int, float]:
    text = store.read_text_or_none(f"runs/{run_id}/metrics.jsonl") or ""
    return {r["step"]: r["loss"] for r in map(json.loads, filter(str.strip, text.splitlines()))}


# Comparing a resumed run with an uninterrupted one ---------------------------------------------------

def assert_same(got, expected, exact: bool = True) -> None:
    """got, expected: (compared fields of every metrics row, final weights by name). exact: equal bit
    for bit; else losses within rel 1e-4 and weights within rtol 1e-4 / atol 5e-5 (another number of
    processes sums in another order). Every step is logged once in both."""
    import torch

    rows, weights = got
    ref_rows, ref_weights = expected
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]  # each step once, none lost
    assert set(weights) == set(ref_weights)
    if exact:
        assert rows == ref_rows
        differ = [k for k in weights if not torch.equal(weights[k], ref_weights[k])]
        assert not differ, f"weights differ: {differ}"
        return
    for r, ref in zip(rows, ref_rows):
        assert r.keys() == ref.keys() and r["lr"] == ref["lr"] and r["tokens"] == ref["tokens"]
        for k in ("loss", "val_loss", "grad_norm"):
            if k in r:
                assert r[k] == pytest.approx(ref[k], rel=1e-4), (r["step"], k, r[k], ref[k])
    for k in weights:  # atol 5e-5: AdamW moves a rarely seen token's embedding row by ~lr x sign(g), so the
        # summation order's noise in its tiny gradient shows there first (1.8e-5 after 48 steps, transformers 5.24)
        torch.testing.assert_close(weights[k], ref_weights[k], rtol=1e-4, atol=5e-5, msg=lambda m, k=k: f"{k}: {m}")


if __name__ == "__main__":
    _main(sys.argv[1:])


# SFT: a tiny chat model and its config --------------------------------------------------------------

SFT_SAMPLE = ROOT / "data" / "sft-sample" / "poetry-chat.jsonl"


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory):
    """A Hugging Face folder: our tokenizer (trained here on the sample conversations) and a random
    tiny Llama with a 256-token context. Weights drawn wider than usual (std 0.3, not 0.02) so that
    attention is peaked: a conversation that saw its neighbours would change the loss by ~4%, not
    ~0.05%, and the packing tests can tell."""
    import torch

    from trainer.data.conversations import load_chat_tokenizer
    from trainer.data.tokenizer import save_tokenizer, train_tokenizer
    from trainer.model.llama import build_model, llama_config

    out = tmp_path_factory.mktemp("chat-model")
    texts = [t["content"] for line in SFT_SAMPLE.read_text(encoding="utf-8").splitlines()
             for t in json.loads(line)["messages"]]
    save_tokenizer(train_tokenizer(texts, 512, 8), out)
    tok = load_chat_tokenizer(out)
    torch.manual_seed(0)
    model_cfg = llama_config("tiny", len(tok), 256, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model_cfg.initializer_range = 0.3
    build_model(model_cfg, "sdpa").save_pretrained(str(out))
    return out


def sft_config(root, init, sources, **overrides):
    from trainer.config import load_config

    values = {"run.id": "base", "storage.bucket": str(root / "bucket"), "storage.local_dir": str(root / "work"),
              "sft.init": str(init), "sft.sources": [str(s) for s in sources], "sft.seq_len": 256,
              "sft.batch_sequences": 4, "sft.max_steps": 4, "sft.warmup_steps": 1, "sft.lr": 0.003,
              "sft.checkpoint_every_steps": 2, "train.log_every_steps": 1, "train.device": "cpu",
              "train.compile": "off", **overrides}
    return load_config(None, values, env={})
