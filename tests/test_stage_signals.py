"""A signal to a command outside the phases that stop by themselves (issue 23): `sft` (and `pretrain`)
alone before its training processes start (pulling the model, packing the conversations' batched
encodes, the lease's wait), and the single-stage commands (`prepare` uploading its shards, `tokenizer`
pulling the corpus, `export`, ...). Each exits 75 at once, as `run` does between stages, and `sft`
releases its lease; before, SIGTERM's default action killed the job (exit -15) and left
runs/<id>/lease.json holding the run for run.lease_seconds."""

import os
import signal
import time
from pathlib import Path

from faults import SFT_SAMPLE, chat_model, sft_config, wait_for_line  # noqa: F401 - fixtures

# Loaded by the CLI process: packing (or uploading a file) says so and then takes its time, so the
# test can signal it there.
SLOW_HOOK = '''
import os
if os.environ.get("TEST_SLOW_PACKING"):
    import sys, time
    import trainer.data.conversations as _conv
    _encode = _conv.encode_conversations
    def _slow_encode(*a, **k):
        print("TEST: packing", file=sys.stderr, flush=True)
        time.sleep(float(os.environ["TEST_SLOW_PACKING"]))
        return _encode(*a, **k)
    _conv.encode_conversations = _slow_encode
if os.environ.get("TEST_SLOW_UPLOAD"):
    import sys, time
    import trainer.io.storage as _storage
    _upload = _storage.LocalStorage.upload_file
    def _slow_upload(self, local_path, key):
        if key.startswith(os.environ["TEST_SLOW_UPLOAD_PREFIX"]):
            print(f"TEST: uploading {key}", file=sys.stderr, flush=True)
            time.sleep(float(os.environ["TEST_SLOW_UPLOAD"]))
        return _upload(self, local_path, key)
    _storage.LocalStorage.upload_file = _slow_upload
'''


def hook_env(cli, tmp_path: Path, **extra: str) -> dict:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SLOW_HOOK)
    pythonpath = os.pathsep.join([str(hook), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    return cli.env(PYTHONPATH=pythonpath, **extra)


def stop(proc, log: Path, marker: str) -> tuple[int, float]:
    """SIGTERM once `marker` is in the log; (exit code, seconds from the signal to the exit)."""
    assert wait_for_line(log, marker, proc, timeout=180), log.read_text()[-3000:]
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    return code, time.time() - sent


def test_sigterm_while_sft_packs_exits_75_and_releases_the_lease(cli, chat_model, tmp_path):  # noqa: F811
    cfg = sft_config(tmp_path, chat_model, [SFT_SAMPLE])
    config = cli.write_config(cfg, tmp_path / "sft.yaml")
    log = tmp_path / "sft.log"
    proc = cli.start("sft", config, log=log, env=hook_env(cli, tmp_path, TEST_SLOW_PACKING="30"))
    lease = Path(cfg.storage.bucket) / "runs" / "base-sft" / "lease.json"
    try:
        assert wait_for_line(log, "TEST: packing", proc, timeout=180), log.read_text()[-3000:]
        assert lease.is_file()
        code, elapsed = stop(proc, log, "TEST: packing")
    finally:
        cli.kill(proc)
    out = log.read_text()
    assert code == 75, out[-3000:]
    assert elapsed < 5, elapsed  # within the 25 s grace, not after the packing's 30 s
    assert "sft: received signal 15 before training" in out
    assert not lease.exists()  # released: the rerun starts at once, on any host
    assert not list(Path(cfg.storage.bucket).glob("runs/base-sft/checkpoints/*"))


def test_sigterm_while_prepare_alone_uploads_exits_75(cli, tiny_config, tmp_path):
    cfg = tiny_config(tmp_path)
    config = cli.write_config(cfg, tmp_path / "c.yaml")
    log = tmp_path / "prepare.log"
    proc = cli.start("prepare", config, log=log, env=hook_env(cli, tmp_path, TEST_SLOW_UPLOAD="30",
                                                                  TEST_SLOW_UPLOAD_PREFIX="data/"))
    try:
        code, elapsed = stop(proc, log, "TEST: uploading data/")  # the tokenizer is published, the shards next
    finally:
        cli.kill(proc)
    out = log.read_text()
    assert code == 75, out[-3000:]
    assert elapsed < 5, elapsed
    # Shards are uploaded as they are written, inside prepare's own signal handling (issue 22)
    assert "prepare: received signal 15: stopping" in out
    assert not list(Path(cfg.storage.bucket).glob("data/*/index.json"))  # the shards do not count
    assert list(Path(cfg.storage.bucket).glob("tokenizers/*/MANIFEST.json"))  # the stage before is kept
