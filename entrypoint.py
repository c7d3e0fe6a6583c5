#!/usr/bin/env python3
"""Pretrain a Chinese LLaMA-style model from a bucket of text, resumably.

    python entrypoint.py run --config configs/demo.yaml [--section.key=value ...]
    python entrypoint.py pull|tokenizer|prepare|pretrain|export --config ...   (one stage)
    python entrypoint.py generate --checkpoint <url-or-path> --prompt 床前明月光
    python entrypoint.py status --config ...

Exit codes: 0 done, 2 bad config or input (fix and rerun), 75 preempted after a clean checkpoint
(rerun the same command to resume), 1 anything else.
"""

from __future__ import annotations

import os
import sys

EXIT_BAD_INPUT = 2


def _config(config: str | None, overrides: dict, show: bool = True):
    from trainer.config import load_config, to_yaml

    cfg = load_config(config or os.environ.get("CONFIG") or None, overrides)
    if show and int(os.environ.get("RANK", "0")) == 0:
        print("# resolved config\n" + to_yaml(cfg), flush=True)
    return cfg


def run(config: str | None = None, **overrides) -> None:
    """The whole job: pull, tokenizer, prepare, pretrain (torchrun), export, samples."""
    from trainer.launch import run as run_job

    code = run_job(_config(config, overrides))
    if code:
        sys.exit(code)


def pull(config: str | None = None, **overrides) -> None:
    """Resolve data.sources and download remote corpus files into the local cache."""
    from trainer.launch import stage_pull

    for f in stage_pull(_config(config, overrides)):
        print(f"{f.url}\t{f.size}\t{f.local}")


def tokenizer(config: str | None = None, **overrides) -> None:
    """Train (or load, with tokenizer.path) the tokenizer and store it in the bucket."""
    from trainer.launch import bucket, stage_tokenizer

    cfg = _config(config, overrides)
    print(bucket(cfg).url(stage_tokenizer(cfg)))


def prepare(config: str | None = None, **overrides) -> None:
    """Tokenize the corpus into packed shards in the bucket."""
    from trainer.launch import bucket, stage_prepare

    cfg = _config(config, overrides)
    print(bucket(cfg).url(stage_prepare(cfg).data_key))


def pretrain(config: str | None = None, **overrides) -> None:
    """Launch torchrun pretraining (resumes from the newest complete checkpoint of run.id)."""
    from trainer.launch import stage_pretrain

    code = stage_pretrain(_config(config, overrides))
    if code:
        sys.exit(code)


def export(config: str | None = None, **overrides) -> None:
    """Write the Hugging Face model folder runs/<id>/final/ from the newest checkpoint."""
    from trainer.launch import bucket, stage_export

    cfg = _config(config, overrides)
    print(bucket(cfg).url(stage_export(cfg)))


def worker(config: str, artifacts: str) -> None:
    """(internal) One torchrun process of pretraining."""
    from pathlib import Path

    from trainer.launch import Artifacts, worker as run_worker

    run_worker(_config(config, {}, show=False), Artifacts.from_json(Path(artifacts).read_text()))


def generate(checkpoint: str, prompt: str = "床前明月光", config: str | None = None, **overrides) -> None:
    """Sample from an exported model folder (local path or s3:// URL)."""
    from trainer.generate import load_for_generation, sample

    cfg = _config(config, overrides, show=False)
    model, tok = load_for_generation(checkpoint, cfg)
    for text in sample(model, tok, [str(prompt)], cfg.sample):
        print(text)


def status(config: str | None = None, **overrides) -> None:
    """Runs in the bucket: checkpoints, LATEST, last metrics, export."""
    from trainer.status import status_report

    print(status_report(_config(config, overrides, show=False)))


COMMANDS = {"run": run, "pull": pull, "tokenizer": tokenizer, "prepare": prepare, "pretrain": pretrain,
            "export": export, "generate": generate, "status": status, "worker": worker}


def main(argv: list[str] | None = None) -> None:
    import fire

    from trainer.config import ConfigError
    from trainer.data import DataError

    try:
        fire.Fire(COMMANDS, command=argv, name="entrypoint.py")
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
