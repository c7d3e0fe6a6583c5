"""Start the training processes: in this process when the job has one, else torchrun (one node or
the multi-node rendezvous of NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT); and turn what they
did into the job's exit code (0, 75 preempted with a published checkpoint, or the failure)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from trainer.errors import EXIT_FAILED, EXIT_PREEMPTED, Preempted
from trainer.io.storage import Storage
from trainer.log import logger
from trainer.parallel.distributed import node_rank
from trainer.state.protocol import step_name
from trainer.state.run import clear_preempted, preempted_step, published_as_newest


def launch(what: str, store: Storage, run_id: str, run_local: Path, nproc: int, nnodes: int,
           worker_argv: list[str], in_process: Callable[[], object], lease, grace_seconds: int) -> int:
    """Train with nproc x nnodes processes: `in_process()` when that is one (no torchrun: its start
    costs seconds and adds nothing), else `python -m trainer.training.worker <worker_argv>` under torchrun.
    Returns 0, 75 (preempted: rerun to resume) or the failure code."""
    clear_preempted(run_local)
    if nproc * nnodes == 1:
        try:
            in_process()
            return 0
        except Preempted:
            return exit_code(what, store, run_id, run_local, EXIT_PREEMPTED, signalled=True)
    tail = ["-m", "trainer.training.worker", *worker_argv]
    code, signalled = torchrun(nproc, nnodes, tail, lease, grace_seconds, what)
    return exit_code(what, store, run_id, run_local, code, signalled)


def torchrun(nproc: int, nnodes: int, tail: list[str], lease, grace_seconds: int, what: str) -> tuple[int, bool]:
    """Run `python -m torch.distributed.run ... <tail>` until it exits; return (exit code, whether a
    SIGTERM/SIGINT was forwarded). Signals go to torchrun, which passes them to its workers; they
    checkpoint and exit 75. If another job takes the run's lease, the workers are killed at once."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes > 1 or os.environ.get("MASTER_ADDR"):
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank()}",
                f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
                f"--master_port={os.environ.get('MASTER_PORT', '29500')}"]
    else:
        cmd += ["--standalone"]
    logger.info(f"{what}: {' '.join(cmd[2:5])} ... ({nnodes} node(s) x {nproc} process(es))")
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    # torchrun SIGKILLs workers this long after passing on a SIGTERM (torch >= 2.8 reads it; before, 30 s).
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(grace_seconds + 5))
    # The workers run where the user stands (every relative path was resolved from there); the package
    # is found through PYTHONPATH, so a checkout that was never pip-installed works too.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd + tail, env=env, stderr=subprocess.PIPE)
    signalled = []
    relay = threading.Thread(target=_relay_stderr, args=(proc.stderr,), daemon=True)
    relay.start()

    def forward(signum, frame):  # torchrun forwards to its workers, which checkpoint and exit 75
        signalled.append(signum)
        proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = proc.wait(timeout=2)
                break
            except subprocess.TimeoutExpired:
                if lease is not None and lease.lost.is_set():
                    logger.warning(f"{what}: another job took this run over: killing the workers without a checkpoint")
                    kill_tree(proc)
                    lease.check()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        relay.join(timeout=10)
    return code, bool(signalled)


def _relay_stderr(stream) -> None:
    """Copy torchrun's stderr (its workers' too) to ours, line by line, except the traceback of
    torchrun's own SignalException: a signal to torchrun is a clean stop (the workers publish a
    checkpoint and exit 75; exit_code() checks the bucket), and 35 lines of traceback read as a crash."""
    held: list[bytes] = []
    for line in iter(stream.readline, b""):
        if line.startswith(b"Traceback (most recent call last):") or (held and (
                line[:1] in (b" ", b"\n") or line.startswith((b"During handling", b"The above exception")))):
            held.append(line)
            continue
        if held and b"SignalException" in line:  # torchrun got a signal (from us or from the host)
            held = []
            sig = line.rsplit(b":", 1)[-1].strip().decode(errors="replace")
            sys.stderr.write(f"torchrun stopped its workers after signal {sig} (traceback omitted)\n")
            sys.stderr.flush()
            continue
        sys.stderr.buffer.write(b"".join(held) + line)
        sys.stderr.flush()
        held = []
    if held:
        sys.stderr.buffer.write(b"".join(held))
        sys.stderr.flush()


def exit_code(what: str, store: Storage, run_id: str, run_local: Path, code: int, signalled: bool) -> int:
    """torchrun exits 1 when its workers exit 75 after a SIGTERM (it counts them as failed), so the
    workers leave a marker once their final checkpoint is published, and this checks the bucket."""
    if code == 0:
        return 0
    step = preempted_step(run_local)
    if step is not None:
        ok, newest = published_as_newest(store, run_id, step)
        if ok:
            logger.info(f"{what}: preempted; checkpoint {step_name(step)} is published and LATEST names it")
            return EXIT_PREEMPTED
        logger.error(f"{what}: the workers stopped at step {step} but the bucket's newest checkpoint is {newest}")
        return code if code > 0 else EXIT_FAILED
    if signalled:
        logger.info(f"{what}: stopped by a signal before a final checkpoint; the rerun resumes from the newest "
                    f"complete one")
        return EXIT_PREEMPTED
    return code if code > 0 else EXIT_FAILED


def kill_tree(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGKILL a process, its process group when it leads one, and all its descendants (torchrun
    starts its workers in sessions of their own), as when the machine is lost; wait until they are
    gone and return the process's exit code. The one process-tree killer: the tests use it too."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:  # started with start_new_session=True
            os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    code = proc.wait(timeout=timeout)
    psutil.wait_procs(tree, timeout=timeout)
    return code
