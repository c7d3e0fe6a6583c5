"""Reading a Config: defaults < YAML file < environment (the keys containers need) < `--section.key=value`.

Every value written reaches the run or is refused: unknown keys, wrong types, choices outside a
Literal, duplicate YAML keys and files that are not UTF-8 are errors, collected and raised together
in one ConfigError, each naming the file and line or the key to change. A str field takes the text
as written (`run.id: 1.10` is the run "1.10", not the number 1.1).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from trainer.config.check import check
from trainer.config.schema import Config

# Environment variables that set config keys (containers and launchers pass settings this way).
# Credentials are never config keys: boto3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY itself.
ENV_KEYS = {
    "RUN_ID": "run.id",
    "BUCKET": "storage.bucket",
    "AWS_ENDPOINT_URL": "storage.endpoint_url",
    "AWS_REGION": "storage.region",
    "LOCAL_DIR": "storage.local_dir",
}


class ConfigError(ValueError):
    """One or more invalid configuration values; the message lists each with its key."""


@dataclass(frozen=True)
class Written:
    """A value as the user wrote it (`text`) and as YAML reads it (`value`): str fields take the
    text, so an identifier like 1.10 never passes through float."""

    text: str
    value: object


def hints(section: str) -> dict[str, object]:
    """{field: type} of one section."""
    return typing.get_type_hints(typing.get_type_hints(Config)[section])


def _coerce(value, hint, key: str, problems: list[str]):
    """`value` (YAML, the environment, a CLI string or fire) as the field's type `hint`, or None
    with a problem recorded. Strings for non-str fields are read as YAML scalars."""
    if typing.get_origin(hint) is tuple:
        if isinstance(value, str):  # from the command line: a YAML list (items as written), or one item
            parsed = _written_yaml(value, key) if value.strip() else value
            value = parsed if isinstance(parsed, list) else [value]
        value = [value] if isinstance(value, Written) else value
        if not isinstance(value, (list, tuple)):
            problems.append(f"{key}: expected a list, got {value!r}")
            return None
        item = typing.get_args(hint)[0]
        return tuple(_coerce(v, item, f"{key}[{i}]", problems) for i, v in enumerate(value))
    wants_text = hint is str or typing.get_origin(hint) is typing.Literal
    if isinstance(value, Written):
        value = value.text if wants_text else value.value
    elif isinstance(value, str) and not wants_text and value.strip():
        value = _yaml_scalar(value)
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        problems.append(f"{key}: {value!r} is not one of {', '.join(choices)}")
        return None
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        value = _float_or(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # a Python int from a saved tree: its digits are unambiguous; a float is not
    ok = {bool: isinstance(value, bool), int: number and float(value).is_integer(),
          float: number, str: isinstance(value, str)}
    if hint not in ok:
        raise TypeError(f"unsupported config type {hint} for {key}")
    if ok[hint]:
        return hint(value)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string (quote it)"}
    problems.append(f"{key}: expected {names[hint]}, got {value!r}")
    return None


def _yaml_scalar(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _written_yaml(text: str, key: str):
    """`text` as YAML with its scalars Written (a list's items keep their text); text itself when it
    is not YAML."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return text
    return text if node is None else _tree(node, f"--{key}")


def _float_or(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix:
            flat.update(_flatten(v, f"{key}."))
        else:
            flat[key] = v
    return flat


def read_text(path: str) -> str:
    """The file's text; a BOM is dropped. Not UTF-8: one line naming the file, the line, and what the
    bytes look like (GBK from Windows Notepad, UTF-16)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        looks = "UTF-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else None
        if looks is None:
            try:
                data.decode("gb18030")
                looks = "GBK/GB18030"
            except UnicodeDecodeError:
                looks = f"byte 0x{data[e.start]:02x} is not UTF-8"
        raise ConfigError(f"{path}:{line}: not UTF-8 (looks like {looks}); save it as UTF-8") from None


def _tree(node: yaml.Node, path: str, where: str = ""):
    """A YAML node as plain dicts and lists with Written scalars; a key twice in any mapping (at any
    depth, lists of mappings too) is an error naming both lines. PyYAML keeps the last silently."""
    if isinstance(node, yaml.MappingNode):
        out, lines = {}, {}
        for key_node, value_node in node.value:
            key = yaml.SafeLoader("").construct_object(key_node)
            dotted = f"{where}.{key}" if where else str(key)
            line = key_node.start_mark.line + 1
            if key in out:
                raise ConfigError(f"{path}:{line}: duplicate key '{dotted}' (first at line {lines[key]}); "
                                  "write each key once")
            out[key], lines[key] = _tree(value_node, path, dotted), line
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_tree(v, path, f"{where}[{i}]") for i, v in enumerate(node.value)]
    return Written(node.value, yaml.SafeLoader("").construct_object(node))


def read_yaml(path: str) -> dict:
    """The sections of a YAML config file, scalars as Written. Raises ConfigError (one line) for a
    missing file, bad YAML, a duplicate key, or a file that is not UTF-8."""
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    text = read_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    tree = {} if node is None else _tree(node, path)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (run:, data:, ...)")
    return tree


def load_config(path: str | None = None, overrides: dict | None = None, env: dict | None = None) -> Config:
    """Build the Config from defaults, the YAML file at `path`, the environment and overrides.

    `overrides` maps dotted keys ("train.max_steps") to values (strings are parsed as YAML, except
    for str fields, which take them as written). Raises ConfigError listing every problem; from this
    machine's environment (env None) that includes optional packages the config needs and this
    machine lacks (missing_packages).
    """
    problems: list[str] = []
    layers: list[tuple[str, dict]] = []
    if path:
        tree = read_yaml(path)
        for section, body in tree.items():
            if not isinstance(body, dict):
                shown = body.text if isinstance(body, Written) else body
                problems.append(f"{section}: expected a mapping of keys, got {shown!r} (in {path})")
        layers.append((str(path), _flatten({k: v for k, v in tree.items() if isinstance(v, dict)})))
    here = env is None  # this machine's environment: a command about to run here, not a saved or rendered config
    env = os.environ if env is None else env
    layers.append(("environment", {key: env[name] for name, key in ENV_KEYS.items() if env.get(name)}))
    layers.append(("overrides", dict(overrides or {})))

    types = {s.name: hints(s.name) for s in dataclasses.fields(Config)}
    values: dict[str, dict] = {s: {} for s in types}
    for source, flat in layers:
        for key, raw in flat.items():
            section, _, name = key.partition(".")
            if section not in types:
                problems.append(f"{key}: unknown section '{section}' (from {source}); known: {', '.join(types)}")
                continue
            if name not in types[section]:
                problems.append(f"{key}: unknown key (from {source}); known in {section}: {', '.join(types[section])}")
                continue
            before = len(problems)
            value = _coerce(raw, types[section][name], key, problems)
            if len(problems) == before:  # a value that doesn't parse keeps the default (and its problem)
                values[section][name] = value
    # Check the values that parsed too, so one error lists every problem, not the first kind only.
    cfg = Config(**{s: typing.get_type_hints(Config)[s](**values[s]) for s in types})
    problems += check(cfg) + (missing_packages(cfg) if here else [])
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return cfg


def missing_packages(cfg: Config) -> list[str]:
    """Optional packages the config names that this machine lacks. Checked only for a command about
    to run here (load_config from the environment): a config saved with a run or rendered by
    `submit` for another machine (the image) may name them."""
    from importlib.util import find_spec

    if "wandb" in cfg.run.report_to and find_spec("wandb") is None:
        return ["run.report_to: wandb is not installed here: pip install '.[wandb]', or leave wandb out of "
                "run.report_to"]
    return []


def get(cfg: Config, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def to_dict(cfg: Config) -> dict:
    """Plain nested dict (tuples as lists) for YAML/JSON. Holds no secrets: credentials are never keys."""
    def plain(v):
        return list(v) if isinstance(v, tuple) else v
    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()} for s in
            (f.name for f in dataclasses.fields(Config))}


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False)


def load_config_tree(tree: dict) -> Config:
    """Rebuild a Config from a to_dict tree (saved inside a checkpoint or a run folder, or built by
    the planner), ignoring the environment."""
    return load_config(None, _flatten(tree), env={})


def replace(cfg: Config, **dotted) -> Config:
    """A copy of cfg with dotted keys changed: replace(cfg, **{"train.max_steps": 5})."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        section, _, name = key.partition(".")
        tree[section][name] = value
    return load_config_tree(tree)
