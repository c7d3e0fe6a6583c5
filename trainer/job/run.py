"""`run`: the whole job, stage after stage (trainer/job/stages.py), under the run's lease.

Node 0 holds runs/<id>/lease.json throughout; SIGTERM between stages exits 75 at once (finished
stages are reused by the rerun); during training the loop turns it into a published checkpoint.
"""

from __future__ import annotations

from trainer.config import Config
from trainer.errors import EXIT_PREEMPTED, Preempted, stop_on_signals
from trainer.io.storage import join
from trainer.job.stages import (
    bucket,
    check_before_start,
    check_tokenizer_kept,
    hold_lease,
    prepare_inputs,
    stage_export,
    stage_pretrain,
    stage_pull,
    stage_report,
    stage_sft,
    stage_tokenizer,
)
from trainer.log import logger
from trainer.parallel.distributed import node_rank


def run(cfg: Config) -> int:
    """The whole job. Returns the process exit code (0 done, 75 preempted: rerun to resume)."""
    check_before_start(cfg)
    restore = stop_on_signals(between_stages)
    try:
        lease = hold_lease(cfg)
        try:
            return run_stages(cfg, lease)
        finally:
            if lease is not None:
                lease.release()
    except Preempted:
        return EXIT_PREEMPTED
    finally:
        restore()


def run_stages(cfg: Config, lease=None) -> int:
    files = stage_pull(cfg)
    check_tokenizer_kept(cfg, files)
    tok_key = stage_tokenizer(cfg, files)
    arts = prepare_inputs(cfg, files, tok_key)
    code = stage_pretrain(cfg, arts, lease)
    if code != 0:
        logger.info(f"pretrain exited with {code}" +
                    (" (preempted: run the same command again to resume)" if code == EXIT_PREEMPTED else ""))
        return code
    if node_rank() != 0:
        return 0
    lease.check()
    key = stage_export(cfg)
    report_key = stage_report(cfg, files)
    store = bucket(cfg)
    logger.info(f"done. bucket: {store.url()}  run: {store.url(f'runs/{cfg.run.id}')}  model: {store.url(key)}  "
                f"report: {store.url(join(report_key, 'report.md'))}")
    if cfg.sft.after_pretrain:
        return stage_sft(cfg)
    return 0


def between_stages(signum: int) -> str:
    """The line a signal logs between stages (errors.stop_on_signals raises Preempted after it)."""
    return (f"received signal {signum} between stages: exiting with {EXIT_PREEMPTED} (rerun to continue; "
            f"finished stages are reused)")
