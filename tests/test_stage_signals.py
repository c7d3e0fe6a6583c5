"""`sft` alone (and `pretrain` alone) before its training processes start: pulling the model,
packing the conversations (batched encodes), the lease's wait. A signal there exits 75 at once and
releases the lease, as `run` does between stages (issue 23); before, SIGTERM's default action killed
the job (exit -15) and left runs/<id>/lease.json to hold the run for run.lease_seconds."""

import os
import signal
import time
from pathlib import Path

from faults import SFT_SAMPLE, chat_model, sft_config, wait_for_line  # noqa: F401 - fixtures

# Loaded by the CLI process: packing says so and then takes its time, so the test can signal it.
SLOW_PACKING_HOOK = '''
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
'''


def test_sigterm_while_sft_packs_exits_75_and_releases_the_lease(cli, chat_model, tmp_path):  # noqa: F811
    cfg = sft_config(tmp_path, chat_model, [SFT_SAMPLE])
    config = cli.write_config(cfg, tmp_path / "sft.yaml")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_PACKING_HOOK)
    pythonpath = os.pathsep.join([str(hook), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    log = tmp_path / "sft.log"
    proc = cli.start("sft", config, log=log, env=cli.env(TEST_SLOW_PACKING="30", PYTHONPATH=pythonpath))
    try:
        assert wait_for_line(log, "TEST: packing", proc, timeout=180), log.read_text()[-3000:]
        lease = Path(cfg.storage.bucket) / "runs" / "base-sft" / "lease.json"
        assert lease.is_file()
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        elapsed = time.time() - sent
    finally:
        cli.kill(proc)
    out = log.read_text()
    assert code == 75, out[-3000:]
    assert elapsed < 5, elapsed  # within the 25 s grace, not after the packing's 30 s
    assert "sft: received signal 15 before training" in out
    assert not lease.exists()  # released: the rerun starts at once, on any host
    assert not list(Path(cfg.storage.bucket).glob("runs/base-sft/checkpoints/*"))
