"""One training process: a torchrun worker, or the only process of a one-process job.

    python -m trainer.training.worker --stage pretrain --config resolved.yaml --artifacts artifacts.json
        (and --init init.json with model.init: its folder, config.json and fingerprint)
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
        state = train(make_task(), cfg, bucket(cfg), d, lease)
    except BaseException:
        shutdown_distributed()
        raise
    shutdown_distributed(barrier=True)
    return asdict(state)


def pretrain_task(cfg: Config, arts: Artifacts, init: dict | None = None) -> PretrainTask:
    """The pretraining task, with the shards and the tokenizer fetched to this machine; init: the
    model.init folder on this machine, its config.json and fingerprint (stages.init_model)."""
    store, local_root = bucket(cfg), Path(cfg.storage.local_dir)
    dirs = [fetch_folder(store, key, local_root) for key in arts.keys]  # a mixture: every source's shards
    parts = [(d, json.loads((d / "index.json").read_text())) for d in dirs]
    return PretrainTask(cfg, *parts[0], fetch_folder(store, arts.tokenizer_key, local_root), init,
                        components=parts if arts.data_keys else None)


def pretrain_worker(cfg: Config, arts: Artifacts, lease=None, init: dict | None = None) -> dict:
    return run_task(cfg, lambda: pretrain_task(cfg, arts, init), lease)


def sft_worker(cfg: Config, data_dir: Path, init_dir: Path, lease=None) -> dict:
    return run_task(cfg, lambda: SftTask(cfg, Path(data_dir), Path(init_dir)), lease)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.training.worker")
    parser.add_argument("--stage", choices=("pretrain", "sft"), required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--artifacts")
    parser.add_argument("--data")
    parser.add_argument("--init")  # sft: the model folder; pretrain: init.json (model.init)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.stage == "pretrain":
        init = json.loads(Path(args.init).read_text()) if args.init else None
        pretrain_worker(cfg, Artifacts.from_json(Path(args.artifacts).read_text()), init=init)
    else:
        sft_worker(cfg, Path(args.data), Path(args.init))


if __name__ == "__main__":
    main(sys.argv[1:])
