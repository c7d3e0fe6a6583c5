"""A signal during tokenizer training (issue 23): the BPE merges run in Rust and return to Python only
when done, so they run in a child process (trainer/data/child_process.py) that the job kills when
SIGTERM or SIGINT comes. Through the CLI: exit 75 within seconds of the signal (the 25 s grace is
the contract launchers give), nothing in the bucket, the rerun trains and publishes; a signal after
the merges are done waits for the publish, and the rerun reuses that tokenizer. In process: the
child's tokenizer is byte for byte the in-process one."""

import json
import os
import random
import signal
import time
from pathlib import Path

import psutil
import pytest

from faults import wait_for_line
from trainer.data.child_process import call_in_child
from trainer.data.shards import tokenizer_fingerprint
from trainer.data.tokenizer import save_tokenizer, train_in_child, train_tokenizer

GRACE_S = 25  # what launchers give between SIGTERM and SIGKILL (docs/reliability.md)
MERGING = r"merging to \d+ tokens"  # the child's line once Rust has the words and starts the merges
TRAINED = r"tokens trained in"

# Loaded by the CLI process (on PYTHONPATH): SIGTERM to itself as soon as the trained tokenizer is
# being saved, i.e. after the merges are done and before anything is published.
SIGTERM_AFTER_TRAINING_HOOK = '''
import os
if os.environ.get("TEST_SIGTERM_AFTER_TRAINING"):
    import signal
    import trainer.data.tokenizer as _tok
    _save = _tok.save_tokenizer
    def _signal_then_save(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        return _save(*a, **k)
    _tok.save_tokenizer = _signal_then_save
'''


def random_han_corpus(path: Path, n_docs: int = 4000, chars: int = 200) -> Path:
    """Seeded random Han text: every pair of characters about equally rare, so the merges (not the
    word count) take the time: ~9 s to vocab 8000 on these 2 shared cores, whatever the load."""
    rng = random.Random(0)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    lines = (json.dumps({"text": "".join(rng.choice(han) for _ in range(chars))}, ensure_ascii=False)
             for _ in range(n_docs))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def slow_config(tiny_config, tmp_path):
    corpus = random_han_corpus(tmp_path / "han.jsonl")
    return tiny_config(tmp_path, {"data.sources": [str(corpus)], "tokenizer.vocab_size": 8000,
                                  "tokenizer.sample_bytes": 5_000_000})


def bucket_files(cfg) -> list[str]:
    root = Path(cfg.storage.bucket)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_the_child_trains_the_same_tokenizer_as_in_process(tiny_docs, tmp_path):
    here = train_tokenizer(tiny_docs, 512, 4, 2, pre_tokenizer="qwen2")
    there, rss = train_in_child(tiny_docs, 512, 4, 2, "qwen2")
    assert there.to_str() == here.to_str()
    save_tokenizer(here, tmp_path / "here")
    save_tokenizer(there, tmp_path / "there")
    files = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "there").iterdir()) and "tokenizer.json" in files
    assert all((tmp_path / "here" / f).read_bytes() == (tmp_path / "there" / f).read_bytes() for f in files)
    assert tokenizer_fingerprint(tmp_path / "here") == tokenizer_fingerprint(tmp_path / "there")
    assert rss > 10 * 2**20  # the child's own peak (an interpreter with tokenizers loaded)


def test_a_childs_error_or_death_is_raised_here():
    with pytest.raises(ValueError, match="invalid literal"):
        call_in_child(int, ("x",))
    with pytest.raises(RuntimeError, match=r"died \(exit code 3"):
        call_in_child(os._exit, (3,))


@pytest.mark.parametrize("command,signum", [("tokenizer", signal.SIGTERM), ("run", signal.SIGINT)])
def test_signal_during_the_merges_exits_75_at_once_then_rerun_trains(cli, slow_config, tmp_path, command, signum):
    config = cli.write_config(slow_config, tmp_path / "c.yaml")
    log = tmp_path / "stopped.log"
    proc = cli.start(command, config, log=log)
    try:
        assert wait_for_line(log, MERGING, proc, timeout=180), log.read_text()[-3000:]
        time.sleep(0.3)  # inside the merges (they take ~9 s here; 0.3 s leaves room for a machine 20x faster)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the merges run in a child process"
        sent = time.time()
        proc.send_signal(signum)
        code = proc.wait(GRACE_S + 5)
        elapsed = time.time() - sent
        gone, alive = psutil.wait_procs(children, timeout=5)
    finally:
        cli.kill(proc)
    out = log.read_text()
    assert code == 75, out[-3000:]
    assert elapsed < GRACE_S, f"exit 75 came {elapsed:.1f} s after the signal"
    assert elapsed < 5, elapsed  # seconds, not the merges' remaining time (before: after the merges, 41 s)
    assert not alive, f"training process left running: {alive}"
    assert TRAINED not in out, "the signal should have come during the merges"
    assert "before the tokenizer was trained" in out
    assert bucket_files(slow_config) == []  # nothing half-published; `run` released its lease too

    rerun = cli.run("tokenizer", config)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert TRAINED in rerun.stdout
    assert [f for f in bucket_files(slow_config) if f.endswith("MANIFEST.json")] == \
        [f"tokenizers/{rerun.stdout.strip().rsplit('/tokenizers/', 1)[1]}/MANIFEST.json"]


def test_signal_after_the_merges_publishes_then_exits_75_and_the_rerun_reuses(cli, tiny_config, tmp_path):
    cfg = tiny_config(tmp_path)
    config = cli.write_config(cfg, tmp_path / "c.yaml")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SIGTERM_AFTER_TRAINING_HOOK)
    pythonpath = os.pathsep.join([str(hook), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    stopped = cli.run("tokenizer", config, env=cli.env(TEST_SIGTERM_AFTER_TRAINING="1", PYTHONPATH=pythonpath))
    assert stopped.returncode == 75, stopped.stdout[-3000:]
    assert TRAINED in stopped.stdout and "after training" in stopped.stdout
    manifests = [f for f in bucket_files(cfg) if f.endswith("MANIFEST.json")]
    assert len(manifests) == 1 and manifests[0].startswith("tokenizers/"), bucket_files(cfg)
    published = {f: (Path(cfg.storage.bucket) / f).read_bytes() for f in bucket_files(cfg)}

    rerun = cli.run("tokenizer", config)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "tokenizer: reusing" in rerun.stdout and TRAINED not in rerun.stdout
    assert {f: (Path(cfg.storage.bucket) / f).read_bytes() for f in bucket_files(cfg)} == published


def test_kill_9_of_the_job_ends_the_training_child(cli, slow_config, tmp_path):
    config = cli.write_config(slow_config, tmp_path / "c.yaml")
    log = tmp_path / "killed.log"
    proc = cli.start("tokenizer", config, log=log)
    try:
        assert wait_for_line(log, MERGING, proc, timeout=180), log.read_text()[-3000:]
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)  # the parent alone, as the OOM killer would
        proc.wait(10)
        gone, alive = psutil.wait_procs(children, timeout=10)
    finally:
        cli.kill(proc)
    assert children and not alive, f"orphaned training process still running: {alive}"
    assert TRAINED not in log.read_text()
