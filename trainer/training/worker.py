"""One training process: a torchrun worker, or the only process of a one-process job.

    python -m trainer.training.worker --stage pretrain --config resolved.yaml --artifacts artifacts.json
    python -m trainer.training.worker --stage sft --config resolved.yaml --data <packed rows> --init <model folder>
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from trainer.config import Config, load_config
from trainer.io.artifacts import Artifacts, bucket, fetch_folder
from trainer.log import setup_logging
from trainer.parallel.distributed import setup_distributed, shutdown_distributed
from trainer.training.loop import Task, train
from trainer.training.tasks import PretrainTask, SftTask


def run_task(cfg: Config, make_task: Callable[[], Task], lease=None) -> dict:
    """Set up this process (rank, device, logging), train the task, tear the process group down;
    return the final loop state as a dict."""
    d = setup_distributed(cfg.train.device)
    setup_logging(d.rank)
    try:
        return asdict(train(make_task(), cfg, bucket(cfg), d, lease))
    finally:
        shutdown_distributed()


def pretrain_task(cfg: Config, arts: Artifacts) -> PretrainTask:
    """The pretraining task, with the shards and the tokenizer fetched to this machine."""
    store, local_root = bucket(cfg), Path(cfg.storage.local_dir)
    data_dir = fetch_folder(store, arts.data_key, local_root)
    index = json.loads((data_dir / "index.json").read_text())
    return PretrainTask(cfg, data_dir, index, fetch_folder(store, arts.tokenizer_key, local_root))


def pretrain_worker(cfg: Config, arts: Artifacts, lease=None) -> dict:
    return run_task(cfg, lambda: pretrain_task(cfg, arts), lease)


def sft_worker(cfg: Config, data_dir: Path, init_dir: Path, lease=None) -> dict:
    return run_task(cfg, lambda: SftTask(cfg, Path(data_dir), Path(init_dir)), lease)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.training.worker")
    parser.add_argument("--stage", choices=("pretrain", "sft"), required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--artifacts")
    parser.add_argument("--data")
    parser.add_argument("--init")
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.stage == "pretrain":
        pretrain_worker(cfg, Artifacts.from_json(Path(args.artifacts).read_text()))
    else:
        sft_worker(cfg, Path(args.data), Path(args.init))


if __name__ == "__main__":
    main(sys.argv[1:])
