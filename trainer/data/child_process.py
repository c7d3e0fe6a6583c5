"""One long native call in a child process, so that a signal to the job stops it at once.

`tokenizers`' train_from_iterator runs the BPE merges in Rust and returns to Python only when they
are done (41 s in issue 23; minutes at a large vocabulary), so the calling process cannot run a
Python signal handler before then: SIGTERM exited 75 after the 25 s grace launchers give, and threw
the finished tokenizer away. Measured here: the call releases the GIL (a ticker thread in the same
process ran at least every 55 ms through a 17 s training), so a thread would let the main thread's
handler run, but a thread cannot be stopped: the process would exit with Rust still merging, holding
its memory (GBs), and Python's shutdown would wait for it or cut it off mid-call. A child process
can be SIGKILLed, and its memory goes with it.

The parent waits on a pipe, which wakes for a signal handler (PEP 475: the wait goes on only when
the handler returns), so stop_on_signals' Preempted is raised within milliseconds and the `finally`
kills the child. The child ignores SIGTERM and SIGINT (a Ctrl-C reaches the whole process group:
the parent decides) and exits by itself when its parent is gone (kill -9 of the job).
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
import traceback

from trainer.log import setup_logging

PARENT_CHECK_S = 1.0  # how often the child looks for its parent; the native call releases the GIL


def call_in_child(fn, args: tuple = (), name: str = "child"):
    """fn(*args) in a spawned process (nothing forked: a fresh interpreter imports fn's module);
    returns its result or raises its exception here. fn must be a module-level function; args and
    the result are pickled through a pipe (a copy of the arguments lives in the child). Any way out
    (a signal's Preempted, an error) kills the child; a child that dies (the OOM killer: SIGKILL) is
    a RuntimeError naming its exit code."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(fn, args, send), daemon=True, name=name)
    try:
        proc.start()
        send.close()  # the child holds the only writer: its death is EOF here
        try:
            kind, value = receive.recv()  # blocks; a signal handler runs (and may raise) while it waits
        except EOFError:
            proc.join(10)
            raise RuntimeError(f"{name}: the child process died (exit code {proc.exitcode}; -9 is SIGKILL, often "
                               f"the OOM killer)") from None
    finally:
        if proc.pid is not None and proc.is_alive():
            proc.kill()
        if proc.pid is not None:
            proc.join(10)
        receive.close()
    if kind == "error":
        raise value
    return value


def _child(fn, args: tuple, send) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides: it kills us on a signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging()  # the parent's RANK is in the environment: rank 0 logs as before
    threading.Thread(target=_exit_without_parent, args=(os.getppid(),), daemon=True).start()
    try:
        result = ("ok", fn(*args))
    except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
        result = ("error", picklable(e))
    send.send(result)
    send.close()


def _exit_without_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(1)  # orphaned (the parent was killed -9): nobody waits for the result


def picklable(e: BaseException, where: str = "child process") -> BaseException:
    """`e`, or a RuntimeError naming `where` with e's type, message and traceback when e does not pickle."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{where}: {type(e).__name__}: {e}\n{''.join(traceback.format_exception(e))}")
