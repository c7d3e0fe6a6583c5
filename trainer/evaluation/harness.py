"""`entrypoint.py eval --tasks`: benchmark tasks of lm-evaluation-harness (EleutherAI's `lm_eval`,
github.com/EleutherAI/lm-evaluation-harness) on an export or checkpoint, through its own
`simple_evaluate` and Hugging Face model wrapper ("hf"), so the numbers are the ones its users
report for any other model.

Tasks are the harness's names (xcopa_zh, xstorycloze_zh, ...; docs/running.md lists the Chinese
ones), the names of the task files shipped in lm_eval_tasks/ (ceval_cloze, cmmlu_cloze, c3_cloze), or
local task files: a task YAML, or a folder of them, in the harness's own format. Every name
and file is checked before a model is loaded: an unknown name is refused naming the closest ones, a
file that is no YAML names itself and the line (the harness itself skips such files silently, and
would then call the task unknown). lm_eval is an optional dependency (the `eval` extra) and is
imported here only when --tasks is given.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
from pathlib import Path

from trainer.config import ConfigError

INSTALL_HINT = "eval --tasks needs lm-evaluation-harness: pip install 'zh-pretrain[eval]'"
HARNESS_MODULES = ("lm_eval", "accelerate")  # its "hf" model imports accelerate at the top
RESULTS_FILE = "lm_eval.json"  # beside eval.json in runs/<id>/report/
# Task files that come with the package, known by name like the harness's own: C-Eval and CMMLU in
# cloze form (ceval_cloze, cmmlu_cloze: the harness has only their letter form) and C3 (c3_cloze).
SHIPPED_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"
# What the JSON keeps of simple_evaluate's answer: the scores and what makes them reproducible (the
# tasks' configs: prompts, splits, metrics); not pretty_env_info (this machine's pip list) or samples.
KEPT_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
             "n-samples", "lm_eval_version", "transformers_version", "date", "total_evaluation_time_seconds")
# A run's model: <root>/runs/<id>/final or <root>/runs/<id>/checkpoints/step-N; its report is <root>/runs/<id>/report.
RUN_MODEL_URL = re.compile(r"^(?:(?P<root>.*)/)?runs/(?P<run>[^/]+)/(?:final|checkpoints/step-\d+)/?$")


def harness_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in HARNESS_MODULES)


def task_items(tasks) -> list[str]:
    """--tasks as a list: a comma-separated string, or the tuple fire makes of `--tasks=a,b`."""
    if not isinstance(tasks, (str, list, tuple)):  # `--tasks` with no value: fire passes True
        raise ConfigError(f"eval --tasks: expected task names or paths, comma-separated (got {tasks!r})")
    parts = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    items = [p.strip() for p in parts if p.strip()]
    if not items:
        raise ConfigError("eval --tasks: name at least one task (xcopa_zh,xstorycloze_zh) or a task YAML or folder")
    return items


def looks_like_path(item: str) -> bool:
    return item.endswith((".yaml", ".yml")) or "/" in item or item.startswith(".") or Path(item).exists()


def read_task_file(path: Path) -> dict:
    """A task or group YAML as a dict, `!function module.name` tags kept as text (the harness resolves
    them when it loads the task). Raises ConfigError naming the file (and line) when it is no YAML
    mapping with a `task` or `group` key."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    try:
        cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"eval --tasks {path}: not a valid task YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"eval --tasks {path}: not UTF-8 text") from None
    if not isinstance(cfg, dict) or not ({"task", "group"} & set(cfg)):
        raise ConfigError(f"eval --tasks {path}: a task YAML is a mapping with a `task:` (or `group:`) key")
    return cfg


def local_tasks(item: str) -> tuple[Path, list[str]]:
    """(folder for the harness's include_path, the task names to run) for a task YAML or a folder of
    them. A folder runs its groups and the tasks none of its groups lists; files without `task` or
    `group` there are templates other files `include`. Every .yaml there is read: one that is broken
    is refused by name rather than skipped."""
    path = Path(item).expanduser()
    if path.is_file():
        if path.suffix != ".yaml":
            raise ConfigError(f"eval --tasks {item}: name task files *.yaml (the harness reads no other name)")
        cfg = read_task_file(path)
        return path.resolve().parent, [str(cfg.get("group") or cfg["task"])]
    if not path.is_dir():
        raise ConfigError(f"eval --tasks {item}: no such task file or folder")
    groups, tasks, members = [], [], set()
    for file in sorted(path.rglob("*.yaml")):
        if "__pycache__" in file.parts:
            continue
        try:
            cfg = read_task_file(file)
        except ConfigError as e:
            if "`task:`" not in str(e):  # a template (no task, no group) is no error
                raise
            continue
        if "group" in cfg:
            groups.append(str(cfg["group"]))
            listed = cfg.get("task") or []
            members |= {t if isinstance(t, str) else str(t.get("task")) for t in listed}
        elif isinstance(cfg["task"], str):
            tasks.append(cfg["task"])
    names = groups + [t for t in tasks if t not in members]
    if not names:
        raise ConfigError(f"eval --tasks {item}: no task YAML (a *.yaml with `task:`) in that folder")
    return path.resolve(), names


def resolve_tasks(tasks) -> tuple[list[str], list[Path], bool]:
    """(task names, include folders, whether the harness's own tasks are needed) for --tasks."""
    names, folders, builtin = [], [], False
    for item in task_items(tasks):
        if looks_like_path(item):
            folder, found = local_tasks(item)
            names += [n for n in found if n not in names]
            folders += [folder] if folder not in folders else []
        else:
            builtin = True
            names += [item] if item not in names else []
    return names, folders, builtin


def task_manager(folders: list[Path], builtin: bool):
    """The harness's TaskManager over its own tasks (only when a name needs them: indexing its
    thousands of task files takes seconds), SHIPPED_TASKS and the local folders."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(f) for f in [SHIPPED_TASKS, *folders]], include_defaults=builtin)


def check_known(names: list[str], known: list[str]) -> None:
    unknown = [n for n in names if n not in set(known)]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hints.append(f"{name}" + (f" (closest: {', '.join(close)})" if close else ""))
        raise ConfigError(f"eval --tasks: no lm-evaluation-harness task {'; '.join(hints)} "
                          f"(`python -m lm_eval ls tasks` lists them; docs/running.md names the Chinese ones)")


def check_numbers(limit, num_fewshot, batch_size) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ConfigError(f"eval --limit: a number of documents per task, or a fraction below 1 (got {limit!r})")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise ConfigError(f"eval --num_fewshot: a whole number, 0 or more (got {num_fewshot!r})")
    auto = isinstance(batch_size, str) and re.fullmatch(r"auto(:\d+)?", batch_size)
    if not auto and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"eval --batch_size: a positive whole number or auto (got {batch_size!r})")


def plan_tasks(tasks, limit=None, num_fewshot=None, batch_size=8):
    """(task names, the harness's TaskManager) for --tasks, everything checked before a model is
    loaded. Raises ConfigError for a bad number, a broken or missing task file, a missing harness
    (INSTALL_HINT) or an unknown task name."""
    check_numbers(limit, num_fewshot, batch_size)
    names, folders, builtin = resolve_tasks(tasks)
    if not harness_installed():
        raise ConfigError(INSTALL_HINT)
    manager = task_manager(folders, builtin)
    check_known(names, manager.all_tasks)
    return names, manager


def run_tasks(folder: Path, names: list[str], manager, device: str, dtype: str, batch_size=8, limit=None,
              num_fewshot=None) -> dict:
    """simple_evaluate on a model folder (an export or checkpoint's Hugging Face files) with the
    harness's "hf" model on `device` in `dtype` ("bfloat16", "float32"): the scores and configs
    of the tasks (KEPT_KEYS of its answer)."""
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(folder), "dtype": dtype}, tasks=names, task_manager=manager,
        device=device, batch_size=batch_size, limit=limit, num_fewshot=num_fewshot, log_samples=False)
    return {k: out[k] for k in KEPT_KEYS if k in out}


def evaluate_tasks(checkpoint: str, resolve_folder, cfg, tasks, limit=None, num_fewshot=None, batch_size=8,
                   out: str | None = None) -> tuple[dict, str | None]:
    """`eval --tasks`: check the tasks, fetch the model (resolve_folder(checkpoint): its local
    folder), run the harness on it on cfg's device (generate.inference_device) and write the JSON
    (results_url). Returns (the results, the URL written or None)."""
    from trainer.evaluation.generate import inference_device

    names, manager = plan_tasks(tasks, limit, num_fewshot, batch_size)
    folder = resolve_folder(checkpoint)
    device, dtype = inference_device(cfg)
    dtype_name = str(dtype).removeprefix("torch.")
    results = {"model": str(checkpoint), "tasks": names, "limit": limit, "num_fewshot": num_fewshot,
               "batch_size": batch_size, "device": device, "dtype": dtype_name}
    results.update(run_tasks(folder, names, manager, device, dtype_name, batch_size, limit, num_fewshot))
    root, key = results_url(str(checkpoint), out)
    if key is None:
        return results, None
    from trainer.io.storage import open_storage, split_url

    store, key = split_url(key, cfg.storage) if root is None else (open_storage(root, cfg.storage), key)
    store.write_text(key, results_json(results))
    return results, store.url(key)


def results_json(results: dict) -> str:
    """The results as JSON, as the harness's own CLI writes them (its handler for numpy numbers and sets)."""
    from lm_eval.utils import handle_non_serializable

    return json.dumps(results, indent=1, ensure_ascii=False, default=handle_non_serializable)


def results_table(results: dict) -> str:
    """The harness's own markdown table of the scores (and of the groups, when there are any)."""
    from lm_eval.utils import make_table

    tables = [make_table(results)]
    if results.get("groups"):
        tables.append(make_table(results, "groups"))
    return "\n".join(tables)


def results_url(checkpoint: str, out: str | None) -> tuple[str | None, str | None]:
    """(storage root, key) the JSON goes to: --out, else the report of the run whose export or
    checkpoint was evaluated (<root>/runs/<id>/report/lm_eval.json, beside eval.json), else (None, None)."""
    if out:
        return None, str(out)
    m = RUN_MODEL_URL.match(str(checkpoint).rstrip("/"))
    if not m:
        return None, None
    return m["root"] or ".", f"runs/{m['run']}/report/{RESULTS_FILE}"
