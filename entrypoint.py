#!/usr/bin/env python3
"""Pretrain a Chinese LLaMA-style model from a bucket of text, resumably.

    python entrypoint.py run --config configs/demo.yaml [--section.key=value ...]
    python entrypoint.py pull|tokenizer|prepare|pretrain|export --config ...   (one stage)
    python entrypoint.py generate --checkpoint <url-or-path> --prompt 床前明月光
    python entrypoint.py status --config ...
    python entrypoint.py eval --checkpoint <url-or-path> [--text file.txt]    (bits/char, degeneration)
    python entrypoint.py eval --checkpoint <url-or-path> --tasks xcopa_zh,... (lm-evaluation-harness)
    python entrypoint.py report --config ...                                  (report.md + plots in the bucket)
    python entrypoint.py plan --gpu_hours 8 --gpu h100 [--json] [--out configs/planned.yaml]
    python entrypoint.py sft --config configs/sft-demo.yaml ; chat --checkpoint <url-or-path>
    python entrypoint.py submit docker|skypilot|k8s --config ... [--nodes N]
    python entrypoint.py <command> --help          (its flags and the config keys it reads)
    zh-pretrain <command> ...                      (the same, installed: pip install .; --config demo
                                                    names a bundled config, configs/demo.yaml)
    python entrypoint.py config --config ...       (the resolved config; config-docs writes docs/config.md)

Exit codes: 0 done, 2 bad config or input, or another live job holds run.id (fix, do not retry),
75 preempted after a clean checkpoint (rerun the same command to resume), 130 `chat` left with
Ctrl-C, 1 anything else (docs/reliability.md).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from trainer.errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED  # noqa: F401 - every exit code lives there

# fire's workaround: fire parses `--run.id=1.10` into the float 1.1 before a command sees it, so
# main() keeps each `--section.key=value` token's text here and _config reads the value as written
# (str fields take the text; load_config reads the others as YAML, as fire would).
_ARGV_TEXT: dict[str, str] = {}


def argv_text(args: list[str]) -> dict[str, str]:
    """{dotted key: its text} for `--section.key=value` and `--section.key value` in args."""
    out = {}
    for i, arg in enumerate(args):
        name, eq, text = arg[2:].partition("=")
        if not arg.startswith("--") or "." not in name:
            continue
        if eq:
            out[name] = text
        elif i + 1 < len(args) and not args[i + 1].startswith("-"):
            out[name] = args[i + 1]
    return out


def unflagged_overrides(args: list[str]) -> list[str]:
    """The words `key=value` in args (the command first) whose key is a config key (`train.lr`) or
    one of the command's parameters (`checkpoint`), and that are not a preceding bare `--flag`'s
    value: `train.lr=1e-3` where `--train.lr=1e-3` was meant. python-fire would run the command
    without them and only then fail on the word it could not consume (a whole run, then exit 2)."""
    import dataclasses
    import inspect

    from trainer.config import Config

    sections = {f.name for f in dataclasses.fields(Config)}
    params = set(inspect.signature(COMMANDS[args[0]]).parameters)
    out = []
    for i, arg in enumerate(args[1:], start=1):
        key, eq, _ = arg.partition("=")
        if arg.startswith("-") or not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", key):
            continue
        if key.split(".")[0] not in sections and key not in params:
            continue
        before = args[i - 1]
        if not (before.startswith("--") and "=" not in before):
            out.append(arg)
    return out


def _config(config: str | None, overrides: dict, show: bool = True):
    """Load and validate the config; `show` prints a short summary (the run, the bucket, the keys
    that differ from their defaults). The full resolved config is saved with the run as
    runs/<id>/config.yaml, and `entrypoint.py config` prints it."""
    from trainer.config import load_config, summary

    overrides = {key: _ARGV_TEXT.get(key, value) for key, value in overrides.items()}
    cfg = load_config(config_path(config or os.environ.get("CONFIG") or None), overrides)
    if show and int(os.environ.get("RANK", "0")) == 0:
        print(summary(cfg), flush=True)
    return cfg


def bundled_configs() -> list[Path]:
    """Where the configs that come with the package are: configs/ beside this file in a checkout,
    else where pip installed them (pyproject.toml's data-files: <prefix>/share/zh-pretrain/configs)."""
    import sysconfig

    prefixes = [sysconfig.get_path("data"), sysconfig.get_path("data", f"{os.name}_user")]
    return [Path(__file__).resolve().parent / "configs",
            *(Path(p) / "share" / "zh-pretrain" / "configs" for p in prefixes if p)]


def config_path(config: str | None) -> str | None:
    """`--config` as given when the file exists there (from where the user stands); else, for a bare
    name or configs/<name> (`--config demo`, `--config configs/tiny.yaml`), the bundled config of
    that name, so an installed `zh-pretrain` finds them without a checkout. Anything else passes
    through: load_config says the file is not there."""
    if not config or Path(config).is_file() or str(Path(config).parent) not in (".", "configs"):
        return config
    name = Path(config).name
    for folder in bundled_configs():
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return str(candidate)
    return config


def _model_folder(checkpoint, cfg) -> Path:
    """The local model folder for `--checkpoint`, one resolver for generate, eval and chat
    (checkpoint.model_dir): an export or a checkpoint folder, local or s3://, e.g.
    <bucket>/runs/<id>/final or <bucket>/runs/<id>/checkpoints/step-N. Raises ConfigError (exit 2,
    one line) when there is no model there; StorageError when the bucket cannot be read."""
    from trainer.config import ConfigError
    from trainer.state.checkpoint import model_dir

    try:
        return model_dir(str(checkpoint), cfg.storage, Path(cfg.storage.local_dir))
    except FileNotFoundError as e:
        raise ConfigError(f"--checkpoint {e}") from None


def _export_settings_kept(config: str | None, overrides: dict) -> frozenset[str] | None:
    """None when a config file is given (its sample.* decide); else the sample.* fields set on the
    command line, which override the model's own generation_config.json (generate and chat use it
    for the rest, as a plain `model.generate()` would)."""
    if config or os.environ.get("CONFIG"):
        return None
    return frozenset(key.partition(".")[2] for key in overrides if key.startswith("sample."))


# The config each command reads, declared next to it (@reads) and listed by its --help.
EVERY_SECTION = "*"  # each section of trainer/config/schema.py's Config, read from the dataclass when asked


def reads(*names: str, but: tuple[str, ...] = ()):
    """Declare the config a command reads: sections ("train"), keys ("train.device"), or
    EVERY_SECTION (every section of Config but `but`: a section added to Config is then listed
    without an edit here). config_reads() resolves and checks the declaration."""
    def declare(fn):
        fn.config_reads = (names, but)
        return fn
    return declare


def config_reads(name: str) -> list[str]:
    """The config sections and keys command `name` reads, by its @reads. Raises ValueError for a
    command without a declaration or a name that is no section or key of Config."""
    from trainer.config import key_rows, sections

    fn = COMMANDS[name]
    if not hasattr(fn, "config_reads"):
        raise ValueError(f"entrypoint.py {name}: declare the config it reads with @reads(...)")
    names, but = fn.config_reads
    every = sections()
    out = [s for s in every if s not in but] if EVERY_SECTION in names else []
    out += [n for n in names if n != EVERY_SECTION and n not in out]
    known = set(every) | {row[0] for s in every for row in key_rows(s)}
    unknown = [n for n in (*out, *but) if n not in known]
    if unknown:
        raise ValueError(f"entrypoint.py {name}: @reads names no config section or key: {', '.join(unknown)}")
    return out


# With model.init the tokenizer and prepare stages take the init's tokenizer and check its config.json
# against these first (trainer/model/hf_init.py), before any corpus work.
INIT_CHECKED = ("model.init", "model.preset", "model.n_layer", "model.d_model", "model.n_head", "model.n_kv_head",
                "model.d_ffn", "model.tie_embeddings", "train.seq_len")


@reads(EVERY_SECTION)
def run(config: str | None = None, **overrides) -> None:
    """The whole job: pull, tokenizer, prepare, pretrain (torchrun), export, samples."""
    from trainer.job.run import run as run_job

    code = run_job(_config(config, overrides))
    if code:
        sys.exit(code)


@reads("storage", "data")
def pull(config: str | None = None, **overrides) -> None:
    """Resolve data.sources and download remote corpus files into the local cache."""
    from trainer.job.stages import stage_pull

    for f in stage_pull(_config(config, overrides)):
        print(f"{f.url}\t{f.size}\t{f.local}")


@reads("run", "storage", "data", "tokenizer", *INIT_CHECKED)
def tokenizer(config: str | None = None, **overrides) -> None:
    """Train (or load, with tokenizer.path or model.init) the tokenizer and store it in the bucket."""
    from trainer.job.stages import bucket, stage_tokenizer

    cfg = _config(config, overrides)
    print(bucket(cfg).url(stage_tokenizer(cfg)))


@reads("run", "storage", "data", "tokenizer", *INIT_CHECKED)
def prepare(config: str | None = None, **overrides) -> None:
    """Tokenize the corpus into packed shards in the bucket."""
    from trainer.job.stages import bucket, prepare_inputs

    cfg = _config(config, overrides)
    for key in prepare_inputs(cfg).keys:  # a mixture (data.weights): each source's shards, one line each
        print(bucket(cfg).url(key))


@reads(EVERY_SECTION, but=("sft",))
def pretrain(config: str | None = None, **overrides) -> None:
    """Launch torchrun pretraining (resumes from the newest complete checkpoint of run.id)."""
    from trainer.job.stages import stage_pretrain

    code = stage_pretrain(_config(config, overrides))
    if code:
        sys.exit(code)


@reads(EVERY_SECTION, but=("sft",))
def export(config: str | None = None, **overrides) -> None:
    """Write the Hugging Face model folder runs/<id>/final/ from the newest checkpoint."""
    from trainer.job.stages import bucket, stage_export

    cfg = _config(config, overrides)
    print(bucket(cfg).url(stage_export(cfg)))


@reads("storage", "train.device", "sample")
def generate(checkpoint: str, prompt: str = "床前明月光", seed: int = 0, config: str | None = None,
             **overrides) -> None:
    """Continue a prompt with a model, by the sample.* settings.

    Args:
        checkpoint: export or checkpoint folder, local or s3:// (runs/<id>/final, runs/<id>/checkpoints/step-N)
        prompt: the text to continue (not empty)
        seed: seeds the sampling; the same seed, model and settings give the same text
        config: YAML config file (sample.*, storage.* and train.device are read from it); without it the
            model's own generation_config.json sets the sampling (sample.* on the command line override it)
    """
    from trainer.config import ConfigError
    from trainer.evaluation.generate import export_sample_config, load_for_generation, sample

    prompt = str(prompt)  # fire reads `--prompt 123` as a number
    if not prompt.strip():
        raise ConfigError(f"generate --prompt: must hold text, not only whitespace (got {prompt!r})")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"generate --seed: expected an integer (got {seed!r})")
    cfg = _config(config, overrides, show=False)
    model, tok = load_for_generation(str(_model_folder(checkpoint, cfg)), cfg)
    kept = _export_settings_kept(config, overrides)
    s = cfg.sample if kept is None else export_sample_config(model, cfg.sample, kept)
    for text in sample(model, tok, [prompt], s, seed=seed, names=["generate --prompt"]):
        print(text)


@reads("storage", "data", "train.device", "sample")
def eval(checkpoint: str, config: str | None = None, text: str | tuple = (), tasks: str | tuple | None = None,  # noqa: A001
         limit: float | None = None, num_fewshot: int | None = None, batch_size: int | str = 8,
         out: str | None = None, **overrides) -> None:
    """Bits per character on the held-out split (and on --text files), plus samples from
    sample.prompts with degeneration metrics; prints JSON. With --tasks, benchmark tasks of
    lm-evaluation-harness instead: prints their table, writes their JSON (docs/running.md).

    Args:
        checkpoint: export or checkpoint folder, local or s3:// (runs/<id>/final, runs/<id>/checkpoints/step-N)
        config: YAML config file (data.* finds the held-out split; sample.* sets the samples)
        text: a text file (any corpus format data.* reads) to score as well; repeat for more
        tasks: lm-evaluation-harness tasks, comma-separated: its task names (xcopa_zh,xstorycloze_zh), the
            cloze C-Eval, CMMLU and C3 shipped here (ceval_cloze,cmmlu_cloze,c3_cloze), task YAML files or
            folders of them; needs pip install 'zh-pretrain[eval]'
        limit: with --tasks: documents per task (a fraction below 1: that share of each task)
        num_fewshot: with --tasks: examples in each prompt (default: each task's own)
        batch_size: with --tasks: requests per forward pass, or auto
        out: with --tasks: where the JSON goes (a path or s3:// URL); default: <root>/runs/<id>/report/lm_eval.json
            for a run's export or checkpoint, beside eval.json
    """
    import contextlib
    import json

    from trainer.config import ConfigError

    texts = [text] if isinstance(text, str) else list(text)
    cfg = _config(config, overrides, show=False)
    if tasks is not None:
        from trainer.evaluation.harness import evaluate_tasks, results_table

        if texts:
            raise ConfigError("eval: --text is scored by bits per character, --tasks by lm-evaluation-harness; "
                              "pass one of them")
        with contextlib.redirect_stdout(sys.stderr):  # the harness's progress lines: stdout holds the table
            result, url = evaluate_tasks(str(checkpoint), lambda c: _model_folder(c, cfg), cfg, tasks, limit,
                                         num_fewshot, batch_size, out)
        print(results_table(result))
        print(f"eval: results in {url}" if url else "eval: not a run's export or checkpoint: pass --out to keep "
              "the JSON", file=sys.stderr)
        return
    from trainer.evaluation.evaluate import evaluate_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # progress lines (pull, conversion) would break the JSON
        folder = _model_folder(checkpoint, cfg)
        result = evaluate_checkpoint(str(folder), cfg, [str(t) for t in texts])
    result["model"] = str(checkpoint)  # what the user named, not the local folder it resolved to
    print(json.dumps(result, ensure_ascii=False, indent=1))


@reads("run", "storage", "data", "model.init", "model.preset", "model.n_layer", "model.d_model", "model.n_head",
       "model.n_kv_head", "model.d_ffn", "train", "sample")
def report(config: str | None = None, **overrides) -> None:
    """(Re)write runs/<run.id>/report/: report.md, PNG plots, TensorBoard events, samples."""
    from trainer.job.stages import bucket, stage_report

    cfg = _config(config, overrides, show=False)
    print(bucket(cfg).url(stage_report(cfg)))


@reads("model.preset", "model.n_layer", "model.d_model", "model.n_head", "model.n_kv_head", "model.d_ffn")
def plan(compute: float | None = None, gpu_hours: float | None = None, gpu: str = "h100", mfu: float = 0.4,
         preset: str | None = None, tokens: float | None = None, seq_len: int = 1024,
         corpus_tokens: float | None = None, gpus: int = 1, price_per_gpu_hour: float | None = None,
         json: bool = False, out: str | None = None, force: bool = False,  # noqa: A002
         config: str | None = None, **overrides) -> None:
    """Compute-optimal model, tokens, batch and lr (DeepSeek LLM fits, Chinchilla beside them).

    A custom shape (model.n_layer, model.d_model, model.n_head, model.n_kv_head, model.d_ffn, as
    flags or in --config) is the model planned: its parameters, FLOPs, memory and micro-batch are
    counted on its model.preset (--preset, else --config's), and --out writes it.

    Args:
        compute: budget in training FLOPs (M x D, DeepSeek LLM's non-embedding FLOPs per token x tokens)
        gpu_hours: budget in GPU-hours instead (with --gpu, --mfu and --gpus)
        gpu: GPU model for a GPU-hour budget and wall time (h100, h200, a100, 4090, ...)
        mfu: model FLOPs utilisation assumed for a GPU-hour budget and wall time
        preset: plan for this model preset (trainer/config/schema.py PRESETS) instead of the optimal one
        tokens: plan for this many training tokens
        seq_len: tokens per training sequence
        corpus_tokens: tokens in your corpus: warns when the plan repeats it too often
        gpus: GPUs the run uses (the batch is a whole number of sequences per GPU)
        price_per_gpu_hour: prints the cost at this price
        json: print the plan as JSON instead of a table
        out: write a config that `run` accepts: --config's (or the defaults) with the plan applied and a
            fresh run.id (<preset>-<tokens>-<hash>)
        force: let --out overwrite an existing file
        config: YAML config the --out file starts from; its custom shape, if any, is planned
    """
    import json as json_lib

    import yaml

    from trainer.config import ConfigError, load_config, load_config_tree, to_dict
    from trainer.config.schema import PRESETS, SHAPE_KEYS, model_shape, shape_overrides
    from trainer.model.plan_output import format_table, plan_json, plan_to_config
    from trainer.model.planner import plan as make_plan

    if out and Path(out).exists() and not force:  # before anything is printed or written
        raise ConfigError(f"plan --out {out}: the file exists; pass --force to overwrite it")
    if out and not Path(out).parent.is_dir():
        raise ConfigError(f"plan --out {out}: no folder {Path(out).parent}")
    other = sorted(set(overrides) - {f"model.{k}" for k in SHAPE_KEYS})
    if other:  # model.preset is read from --config only: on the command line, --preset is the plan's
        raise ConfigError(f"plan --{other[0]}: plan takes a model's shape as flags (--preset and --model.n_layer "
                          f"... --model.d_ffn); set the other keys in --config")
    # --preset under the shape's numbers, so the config check judges them together; a preset that
    # is none is left to the planner to name
    fixed = {"model.preset": preset} if isinstance(preset, str) and preset in PRESETS else {}
    cfg = load_config(config_path(config), {**overrides, **fixed}) if config or overrides or out else None
    shape = model_shape(cfg.model) if cfg is not None and shape_overrides(cfg.model) else None
    base = to_dict(cfg) if out else None
    try:
        # str(): fire reads `--gpu 4090` as the integer 4090
        p = make_plan(compute=compute, gpu_hours=gpu_hours, gpu=str(gpu), mfu=mfu, tokens=tokens, seq_len=seq_len,
                      preset=cfg.model.preset if shape and preset is None else preset, shape=shape,
                      corpus_tokens=corpus_tokens, gpus=gpus, price_per_gpu_hour=price_per_gpu_hour)
    except ValueError as e:
        raise ConfigError(f"plan: {e}") from None
    print(json_lib.dumps(plan_json(p), indent=1) if json else format_table(p))
    if out:
        tree = plan_to_config(p, base)
        load_config_tree(tree)  # what run will read must validate, before anything is written
        text = yaml.safe_dump(tree, allow_unicode=True, sort_keys=False)
        try:
            with open(out, "w" if force else "x", encoding="utf-8") as f:  # "x": never overwrite unasked
                f.write(text)
        except FileExistsError:
            raise ConfigError(f"plan --out {out}: the file exists; pass --force to overwrite it") from None
        print(f"wrote {out} (run.id {tree['run']['id']})", file=sys.stderr)


@reads("run", "storage", "data.on_error", "model.attn_implementation", "train", "checkpoint", "sample", "sft")
def sft(config: str | None = None, **overrides) -> None:
    """Supervised fine-tuning on conversations (sft.sources) from sft.init, resumable; exports
    runs/<sft.run_id>/final/."""
    from trainer.job.stages import stage_sft

    code = stage_sft(_config(config, overrides))
    if code:
        sys.exit(code)


@reads("storage", "train.device", "sample")
def chat(checkpoint: str, system: str = "", config: str | None = None, **overrides) -> None:
    """Interactive terminal chat with a fine-tuned model; reads lines from stdin (a pipe works too).

    Args:
        checkpoint: export or checkpoint folder, local or s3:// (runs/<id>-sft/final, .../checkpoints/step-N)
        system: system prompt the conversation starts with
        config: YAML config file (sample.* sets the sampling); without it the model's own
            generation_config.json does (sample.* on the command line override it)
    """
    from trainer.job.chat import chat_cli

    try:
        cfg = _config(config, overrides, show=False)
        chat_cli(_model_folder(checkpoint, cfg), str(system or ""), cfg,
                 export_settings_kept=_export_settings_kept(config, overrides))
    except KeyboardInterrupt:  # Ctrl-C is how people leave a terminal chat: no traceback
        print(file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


@reads(EVERY_SECTION)
def submit(target: str, config: str | None = None, nodes: int = 1, gpus_per_node: int = 0,
           image: str = "zh-pretrain:latest", accelerator: str = "H100", **overrides) -> None:
    """Print the docker command, SkyPilot task or Kubernetes manifest that runs this config."""
    from trainer.config import ConfigError
    from trainer.job.submit import render

    cfg = _config(config, overrides, show=False)
    try:
        print(render(str(target), cfg, config_path(config), nodes=int(nodes), gpus_per_node=int(gpus_per_node),
                     image=str(image), accelerator=str(accelerator)))
    except ValueError as e:
        raise ConfigError(str(e)) from None


@reads("run", "storage")
def status(config: str | None = None, **overrides) -> None:
    """Runs in the bucket: checkpoints, LATEST, last metrics, export."""
    from trainer.job.status import status_report

    print(status_report(_config(config, overrides, show=False)))


@reads(EVERY_SECTION)
def show_config(config: str | None = None, **overrides) -> None:
    """Print the resolved config as YAML: defaults, the file, the environment and the overrides."""
    from trainer.config import to_yaml

    print(to_yaml(_config(config, overrides, show=False)), end="")


@reads()
def config_docs() -> None:
    """Print docs/config.md (every config key with its type, default and docstring)."""
    from trainer.config import markdown

    print(markdown(), end="")


COMMANDS = {"run": run, "pull": pull, "tokenizer": tokenizer, "prepare": prepare, "pretrain": pretrain,
            "export": export, "generate": generate, "eval": eval, "report": report, "plan": plan, "sft": sft,
            "chat": chat, "submit": submit, "status": status, "config": show_config, "config-docs": config_docs}

CONFIG_FLAG_DOC = "YAML config file (default: $CONFIG, else the defaults in trainer/config.py)"


def prog() -> str:
    """The name the CLI was started by, for usage lines: the console script or entrypoint.py."""
    return "zh-pretrain" if Path(sys.argv[0]).name == "zh-pretrain" else "entrypoint.py"


def command_help(name: str) -> str:
    """`entrypoint.py <name> --help`: usage, what the command does, its own flags (from the
    function's signature and the Args of its docstring) and the config keys it reads (from the
    config dataclasses' docstrings)."""
    import inspect

    from fire import docstrings

    from trainer.config import help_text

    fn = COMMANDS[name]
    info = docstrings.parse(inspect.getdoc(fn) or "")
    arg_docs = {a.name: a.description or "" for a in info.args or []}
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    required = [f"--{p.name}={p.name.upper()}" for p in params if p.default is p.empty]
    keys = config_reads(name)
    usage = " ".join([f"usage: {prog()}", name, *required, "[flags]" if len(required) < len(params) else "",
                      "[--section.key=value ...]" if keys else ""])
    lines = [" ".join(usage.split()), "", info.summary or "", *([info.description] if info.description else [])]
    if params:
        lines += ["", "flags:"]
        for p in params:
            default = "required" if p.default is p.empty else f"default {p.default!r}"
            doc = arg_docs.get(p.name) or (CONFIG_FLAG_DOC if p.name == "config" else "")
            lines.append(f"  --{p.name}  ({default})  {doc}".rstrip())
    if keys:
        lines += ["", "config keys (in the --config YAML, or --section.key=value; docs/config.md lists them all):",
                  help_text(keys)]
    return "\n".join(lines)


def command_summary(fn) -> str:
    """The first sentence of a command's docstring, on one line: the docstring's first line would cut
    a sentence that wraps (eval's and sft's did)."""
    import inspect
    import re

    paragraph = " ".join((inspect.getdoc(fn) or "").split("\n\n")[0].split())
    end = re.search(r"[.!?](?=\s+[A-Z(]|$)", paragraph)  # a full stop before a capital, or the paragraph's end
    return paragraph[:end.end()] if end else paragraph


def overview() -> str:
    """`entrypoint.py --help`: every command with its one-sentence summary (command_summary)."""
    width = max(map(len, COMMANDS))
    rows = [f"  {name:<{width}}  {command_summary(fn)}" for name, fn in COMMANDS.items()]
    return "\n".join([f"usage: {prog()} <command> [flags] [--section.key=value ...]", "", "commands:", *rows,
                      "", f"{prog()} <command> --help lists its flags and the config keys it reads."])


# Single stages: alone, a signal exits 75 as `run` does between stages (not SIGTERM's default -15, the
# process killed mid-upload); run, pretrain and sft stop by themselves, chat keeps Ctrl-C for itself.
STAGE_COMMANDS = ("pull", "tokenizer", "prepare", "export", "report")


def _stop_on_signals(command: str):
    if command not in STAGE_COMMANDS:
        return lambda: None
    from trainer.errors import stop_on_signals
    from trainer.job.run import between_stages

    return stop_on_signals(between_stages)


def main(argv: list[str] | None = None) -> None:
    import fire

    from trainer.config import ConfigError
    from trainer.data.sources import DataError
    from trainer.io.lease import LeaseHeld
    from trainer.io.storage import StorageError
    from trainer.log import setup_logging

    setup_logging()
    args = sys.argv[1:] if argv is None else list(argv)
    own = args[:args.index("--")] if "--" in args else args  # after "--", flags are fire's
    if not args or args[0] in ("-h", "--help", "help"):
        print(overview())
        return
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if "--help" in own or "-h" in own:  # fire would take it for a config key: "unknown section 'help'"
        print(command_help(args[0]))
        return
    bare = unflagged_overrides(own)
    if bare:  # before any work: fire would run the command without them, then fail
        print(f"error: {bare[0]}: an override needs a leading -- (--{bare[0]})", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    _ARGV_TEXT.clear()
    _ARGV_TEXT.update(argv_text(own))
    restore = _stop_on_signals(args[0])
    try:
        fire.Fire(COMMANDS, command=args, name=prog())
    except (ConfigError, DataError, LeaseHeld) as e:  # another job on this run.id: do not retry either
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    except StorageError as e:  # after all retries; the message names the URL (credentials redacted)
        print(f"error: storage: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_FAILED)
    finally:
        restore()


if __name__ == "__main__":
    main()
