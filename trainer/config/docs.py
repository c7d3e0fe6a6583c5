"""Documentation generated from the config dataclasses: `entrypoint.py <command> --help`'s key
list, docs/config.md, and the short summary a command prints at start. Each field's docstring is the
documentation of its option; choices come from its Literal type."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import typing

from trainer.config.load import ENV_KEYS, _flatten, hints, to_dict
from trainer.config.schema import Config


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} for a config dataclass: the string literal right under each
    field (as LitGPT and jsonargparse document options). Raises ValueError naming a field without one."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
    if missing:
        raise ValueError(f"{cls.__name__}: fields without a docstring: {', '.join(missing)}")
    return docs


def section_doc(section: str) -> str:
    """The section's class docstring, on one line."""
    return " ".join((typing.get_type_hints(Config)[section].__doc__ or "").split())


def sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def type_name(key: str) -> str:
    """How a key's value is written: int, float, true|false, list of str, or its choices a|b|c
    (read from the field's Literal type)."""
    section, _, name = key.partition(".")
    hint = hints(section)[name]
    listed = typing.get_origin(hint) is tuple
    if listed:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is typing.Literal:
        kind = "|".join(typing.get_args(hint))
    else:
        kind = "true|false" if hint is bool else hint.__name__
    return f"list of {kind}" if listed else kind


def format_value(value) -> str:
    """A value as it would be written in YAML or on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return json.dumps(list(value), ensure_ascii=False)
    if value == "":
        return '""'
    return str(value)


def key_rows(section: str) -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every key of a section, in declaration order."""
    cls = typing.get_type_hints(Config)[section]
    docs = field_docs(cls)
    return [(f"{section}.{f.name}", type_name(f"{section}.{f.name}"), format_value(getattr(cls(), f.name)),
             docs[f.name]) for f in dataclasses.fields(cls)]


def help_text(names: list[str]) -> str:
    """`--help`'s list of config keys: `names` are sections ("train", every key) or keys
    ("train.device"), grouped by section, each key with its default, type and one-line doc."""
    lines = []
    for section in sections():
        wanted = section in names
        rows = [r for r in key_rows(section) if wanted or r[0] in names]
        if rows:
            lines.append(f"  {section}: {section_doc(section)}")
        for key, kind, default, doc in rows:
            lines.append(f"    --{key}={default}  ({kind})")
            lines.append(f"        {doc}")
    return "\n".join(lines)


def markdown() -> str:
    """docs/config.md: every section and key with its type, default and docstring."""
    env = {key: name for name, key in ENV_KEYS.items()}
    out = ["# Configuration", "",
           "<!-- Generated from trainer/config/schema.py by `python entrypoint.py config-docs > docs/config.md`; "
           "tests/test_cli_help.py fails when this file is not current. -->", "",
           "Values come from, in order: the defaults below, the YAML file (`--config` or `CONFIG`), environment "
           "variables, then `--section.key=value` overrides. Unknown keys, wrong types and bad values are all "
           "reported together, each with its key. `python entrypoint.py <command> --help` lists the keys a "
           "command uses.", ""]
    for section in sections():
        out += [f"## {section}", "", section_doc(section), "", "| key | type | default | |", "|---|---|---|---|"]
        for key, kind, default, doc in key_rows(section):
            doc = doc + (f" (environment: `{env[key]}`)" if key in env else "")
            doc = doc.replace("|", "\\|").replace("<", "\\<")  # a table cell; <bucket> is not an HTML tag
            cells = [f"`{key}`", kind.replace("|", " \\| "), f"`{default}`", doc]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def summary(cfg: Config) -> str:
    """Two or three lines for the start of a command: the run, the bucket, and every key whose value
    differs from its default (the full resolved config is saved with the run as config.yaml)."""
    default = _flatten(to_dict(Config()))
    changed = [f"{k}={format_value(v)}" for k, v in _flatten(to_dict(cfg)).items()
               if v != default[k] and k not in ("run.id", "storage.bucket")]
    changed = [c if len(c) <= 80 else c[:77] + "..." for c in changed]
    head = f"config: run.id={cfg.run.id} storage.bucket={cfg.storage.bucket} model.preset={cfg.model.preset}"
    body = textwrap.wrap("set: " + (", ".join(changed) or "(all defaults)"), 110, subsequent_indent="  ",
                         break_long_words=False, break_on_hyphens=False)
    return "\n".join([head, *body])
