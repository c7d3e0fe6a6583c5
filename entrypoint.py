#!/usr/bin/env python3
"""Pretrain a Chinese LLaMA-style model from a bucket of text, resumably.

    python entrypoint.py run --config configs/demo.yaml [--section.key=value ...]
    python entrypoint.py pull|tokenizer|prepare|pretrain|export --config ...   (one stage)
    python entrypoint.py generate --checkpoint <url-or-path> --prompt 床前明月光
    python entrypoint.py status --config ...
    python entrypoint.py eval --checkpoint <url-or-path> [--text file.txt]    (bits/char, degeneration)
    python entrypoint.py report --config ...                                  (report.md + plots in the bucket)
    python entrypoint.py plan --gpu_hours 8 --gpu h100 [--json] [--out configs/planned.yaml]
    python entrypoint.py sft --config configs/sft-demo.yaml ; chat --checkpoint <url-or-path>
    python entrypoint.py submit docker|skypilot|k8s --config ... [--nodes N]

Exit codes: 0 done, 2 bad config or input, or another live job holds run.id (fix, do not retry),
75 preempted after a clean checkpoint (rerun the same command to resume), 1 anything else
(docs/reliability.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
    from trainer.launch import Artifacts, worker as run_worker

    run_worker(_config(config, {}, show=False), Artifacts.from_json(Path(artifacts).read_text()))


def generate(checkpoint: str, prompt: str = "床前明月光", config: str | None = None, **overrides) -> None:
    """Sample from an exported model folder (local path or s3:// URL)."""
    from trainer.generate import load_for_generation, sample

    cfg = _config(config, overrides, show=False)
    model, tok = load_for_generation(checkpoint, cfg)
    for text in sample(model, tok, [str(prompt)], cfg.sample):
        print(text)


def eval(checkpoint: str, config: str | None = None, text: str | tuple = (), **overrides) -> None:  # noqa: A001
    """Bits per character on the held-out split (and on --text files), plus samples from
    sample.prompts with degeneration metrics; prints JSON."""
    import contextlib
    import json

    from trainer.evaluate import evaluate_checkpoint

    texts = [text] if isinstance(text, str) else list(text)
    cfg = _config(config, overrides, show=False)
    with contextlib.redirect_stdout(sys.stderr):  # progress lines (pull, conversion) would break the JSON
        result = evaluate_checkpoint(str(checkpoint), cfg, [str(t) for t in texts])
    print(json.dumps(result, ensure_ascii=False, indent=1))


def report(config: str | None = None, **overrides) -> None:
    """(Re)write runs/<run.id>/report/: report.md, PNG plots, TensorBoard events, samples."""
    from trainer.launch import bucket, stage_report

    cfg = _config(config, overrides, show=False)
    print(bucket(cfg).url(stage_report(cfg)))


def plan(compute: float | None = None, gpu_hours: float | None = None, gpu: str = "h100", mfu: float = 0.4,
         preset: str | None = None, tokens: float | None = None, seq_len: int = 1024,
         corpus_tokens: float | None = None, gpus: int = 1, price_per_gpu_hour: float | None = None,
         json: bool = False, out: str | None = None, config: str | None = None) -> None:  # noqa: A002
    """Compute-optimal model, tokens, batch and lr (DeepSeek LLM fits, Chinchilla beside them).
    --out writes a config (--config's, or the defaults, with the plan applied) that `run` accepts."""
    import json as json_lib

    import yaml

    from trainer.config import ConfigError, load_config, to_dict
    from trainer.planner import format_table, plan as make_plan, plan_json, plan_to_config

    try:
        # str(): fire reads `--gpu 4090` as the integer 4090
        p = make_plan(compute=compute, gpu_hours=gpu_hours, gpu=str(gpu), mfu=mfu, preset=preset, tokens=tokens,
                      seq_len=seq_len, corpus_tokens=corpus_tokens, gpus=gpus, price_per_gpu_hour=price_per_gpu_hour)
    except ValueError as e:
        raise ConfigError(f"plan: {e}") from None
    print(json_lib.dumps(plan_json(p), indent=1) if json else format_table(p))
    if out:
        tree = plan_to_config(p, to_dict(load_config(config)))
        text = yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)
        Path(out).write_text(text, encoding="utf-8")
        load_config(out)  # what run will read must validate
        print(f"wrote {out}", file=sys.stderr)


def sft(config: str | None = None, **overrides) -> None:
    """Supervised fine-tuning on conversations (sft.sources) from sft.init, resumable; exports
    runs/<sft.run_id>/final/."""
    from trainer.sft import stage_sft

    code = stage_sft(_config(config, overrides))
    if code:
        sys.exit(code)


def chat(checkpoint: str, system: str = "", config: str | None = None, **overrides) -> None:
    """Interactive terminal chat with a fine-tuned model (export or checkpoint, local or s3://)."""
    from trainer.chat import chat_cli

    chat_cli(checkpoint, system, _config(config, overrides, show=False))


def submit(target: str, config: str | None = None, nodes: int = 1, gpus_per_node: int = 0,
           image: str = "zh-pretrain:latest", accelerator: str = "H100", **overrides) -> None:
    """Print the docker command, SkyPilot task or Kubernetes manifest that runs this config."""
    from trainer.config import ConfigError
    from trainer.submit import render

    cfg = _config(config, overrides, show=False)
    try:
        print(render(str(target), cfg, config, nodes=int(nodes), gpus_per_node=int(gpus_per_node),
                     image=str(image), accelerator=str(accelerator)))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def status(config: str | None = None, **overrides) -> None:
    """Runs in the bucket: checkpoints, LATEST, last metrics, export."""
    from trainer.status import status_report

    print(status_report(_config(config, overrides, show=False)))


COMMANDS = {"run": run, "pull": pull, "tokenizer": tokenizer, "prepare": prepare, "pretrain": pretrain,
            "export": export, "generate": generate, "eval": eval, "report": report, "plan": plan, "sft": sft,
            "chat": chat, "submit": submit, "status": status, "worker": worker}


def main(argv: list[str] | None = None) -> None:
    import fire

    from trainer.config import ConfigError
    from trainer.data import DataError
    from trainer.lease import LeaseHeld
    from trainer.storage import StorageError

    try:
        fire.Fire(COMMANDS, command=argv, name="entrypoint.py")
    except (ConfigError, DataError, LeaseHeld) as e:  # another job on this run.id: do not retry either
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    except StorageError as e:  # after all retries; the message names the URL (credentials redacted)
        print(f"error: storage: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
