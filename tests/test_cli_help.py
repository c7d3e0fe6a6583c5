"""Config the user can see: `entrypoint.py <command> --help` for every command, with its own flags
and the config keys it reads (declared next to the command with @reads, every section derived from
the schema; checked against what the commands really read; docs from the config dataclasses'
docstrings); docs/config.md generated the same way and current; the short config summary at start
and the full one from `config`."""

import dataclasses
import inspect
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import entrypoint
from trainer import config as config_mod
from trainer.config import Config, field_docs, load_config, markdown, sections, to_dict

ROOT = Path(__file__).resolve().parent.parent
CONFIG_ENV = ("CONFIG", "RUN_ID", "BUCKET", "LOCAL_DIR", "AWS_ENDPOINT_URL", "AWS_REGION")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in CONFIG_ENV:  # help and summaries show the defaults, not this machine's settings
        monkeypatch.delenv(name, raising=False)


def help_of(capsys, *args: str) -> str:
    entrypoint.main(list(args))  # returns: no SystemExit, so the exit status is 0
    captured = capsys.readouterr()
    assert captured.err == ""
    return captured.out


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s in sections() for f in dataclasses.fields(getattr(Config(), s))]


def keys_of(command: str) -> list[str]:
    names = entrypoint.config_reads(command)
    return [k for k in all_keys() if k in names or k.partition(".")[0] in names]


@pytest.mark.parametrize("command", list(entrypoint.COMMANDS))
def test_help_lists_flags_and_config_keys(capsys, command):
    out = help_of(capsys, command, "--help")
    assert out.startswith(f"usage: entrypoint.py {command}")
    assert "unknown section" not in out
    fn = entrypoint.COMMANDS[command]
    summary = inspect.getdoc(fn).splitlines()[0]
    assert summary in out
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not p.VAR_KEYWORD:
            assert f"\n  --{p.name}  (" in out, p.name
    keys = keys_of(command)
    for key in keys:
        section, _, name = key.partition(".")
        doc = field_docs(type(getattr(Config(), section)))[name]
        assert f"--{key}=" in out and doc in out, key
    for key in set(all_keys()) - set(keys):  # only the keys this command reads
        assert f"--{key}=" not in out, key
    if keys:
        assert out.count("\n    --") == len(keys)


def test_commands_of_the_whole_job_read_every_section_a_new_one_too(monkeypatch):
    """The keys per command are derived: EVERY_SECTION is Config's sections when --help asks, so a
    section added to the schema shows up in run's and pretrain's --help without an edit to entrypoint.py."""
    assert entrypoint.config_reads("run") == sections()
    assert entrypoint.config_reads("pretrain") == [s for s in sections() if s != "sft"]
    real_sections, real_rows = config_mod.sections, config_mod.key_rows
    monkeypatch.setattr(config_mod, "sections", lambda: [*real_sections(), "eval"])
    monkeypatch.setattr(config_mod, "key_rows", lambda s: [("eval.tasks", "str", '""', "")] if s == "eval"
                        else real_rows(s))
    for command in ("run", "pretrain", "submit", "config"):
        assert "eval" in entrypoint.config_reads(command), command
    assert "eval" not in entrypoint.config_reads("status")


def test_a_command_must_declare_real_config_names(monkeypatch):
    def undeclared(config=None):
        """Does something."""

    monkeypatch.setitem(entrypoint.COMMANDS, "undeclared", undeclared)
    with pytest.raises(ValueError, match="undeclared: declare the config it reads"):
        entrypoint.config_reads("undeclared")
    monkeypatch.setitem(entrypoint.COMMANDS, "typo", entrypoint.reads("storage", "train.devise", "smaple")(undeclared))
    with pytest.raises(ValueError, match="typo: @reads names no config section or key: train.devise, smaple"):
        entrypoint.config_reads("typo")


@pytest.fixture
def config_reads_recorded(monkeypatch):
    """The config keys the next command reads once its config is loaded (loading, validation and
    the start-up summary read them all): every section dataclass records reads of its fields.
    Call it before each command; it returns the set the command's reads go into."""
    read: set[str] = set()
    recording = []
    for section in sections():
        cls = type(getattr(Config(), section))
        names = {f.name for f in dataclasses.fields(cls)}

        def get(self, name, _section=section, _names=names):
            if recording and name in _names:
                read.add(f"{_section}.{name}")
            return object.__getattribute__(self, name)

        monkeypatch.setattr(cls, "__getattribute__", get, raising=False)
    load = entrypoint._config

    def loaded(*args, **kwargs):
        cfg = load(*args, **kwargs)
        recording.append(True)
        return cfg

    monkeypatch.setattr(entrypoint, "_config", loaded)

    def restart() -> set[str]:
        read.clear()
        recording.clear()
        return read

    return restart


def test_what_each_command_reads_is_in_its_help(config_reads_recorded, capsys, tmp_path):
    """The declarations next to the commands are true: running the commands that need no GPU or
    training (on a tiny corpus and bucket), every config key they read is one their --help lists."""
    corpus = tmp_path / "c.jsonl"
    poem = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
    corpus.write_text("".join(json.dumps({"text": f"{poem}{i}"}, ensure_ascii=False) + "\n" for i in range(60)),
                      encoding="utf-8")
    common = [f"--storage.bucket={tmp_path / 'bucket'}", f"--storage.local_dir={tmp_path / 'work'}",
              f"--data.sources={json.dumps([str(corpus)])}", "--tokenizer.vocab_size=300", "--data.val_permille=100"]
    for command in ("pull", "tokenizer", "prepare", "report", "status", "config", "submit"):
        recorded = config_reads_recorded()
        entrypoint.main([command, *(["docker"] if command == "submit" else []), *common])
        read = set(recorded)  # before --help's own reads of the defaults
        capsys.readouterr()
        listed = set(keys_of(command))
        assert read, command  # the recording saw the command read its config
        assert read <= listed, (command, sorted(read - listed))


def test_help_shows_defaults_types_and_flag_docs(capsys):
    out = help_of(capsys, "generate", "--help")
    assert "--checkpoint  (required)" in out
    assert "--seed  (default 0)  seeds the sampling" in out
    assert "--sample.temperature=0.8  (float)\n        sampling temperature; 0 = greedy" in out
    assert "--train.device=auto  (auto|cuda|cpu)" in out
    assert "--train.lr=" not in out  # generate reads train.device, not the rest of train
    run = help_of(capsys, "run", "--help")
    assert '--sample.prompts=["床前明月光", "春眠不覺曉", "白日依山盡"]  (list of str)' in run
    assert "--train.compile=auto  (auto|on|off)" in run and "--run.takeover=false  (true|false)" in run


@pytest.mark.parametrize("args", [
    ["run", "-h"],
    ["generate", "--checkpoint=nowhere", "--help"],  # help wins over the other flags: nothing runs
    ["run", "--train.max_steps=5", "--help"],
    ["plan", "--compute=1e19", "--help"],
])
def test_help_anywhere_among_the_flags(capsys, args):
    out = help_of(capsys, *args)
    assert out.startswith(f"usage: entrypoint.py {args[0]}")


def test_help_in_a_subprocess_exits_0():
    for command in ("status", "generate"):
        r = subprocess.run([sys.executable, str(ROOT / "entrypoint.py"), command, "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "unknown section" not in r.stdout + r.stderr and "--storage.bucket=./bucket" in r.stdout


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["help"], []])
def test_overview_lists_every_command(capsys, args):
    out = help_of(capsys, *args)
    for name, fn in entrypoint.COMMANDS.items():
        assert f"  {name} " in out and inspect.getdoc(fn).splitlines()[0] in out


def test_no_command_summary_ends_mid_sentence(capsys):
    """Each overview row is a whole sentence of its command's docstring on one line. The rows were
    the docstrings' first lines: eval's ended "plus samples from", sft's "resumable; exports"."""
    rows = help_of(capsys, "--help").split("commands:\n")[1].split("\n\n")[0].splitlines()
    assert len(rows) == len(entrypoint.COMMANDS)
    for row, (name, fn) in zip(rows, entrypoint.COMMANDS.items()):
        summary = row.split(None, 1)[1]
        doc = " ".join(inspect.getdoc(fn).split())
        assert row.split()[0] == name and doc.startswith(summary), row
        assert summary.endswith((".", "!", "?")), f"{name}: {summary!r} ends mid-sentence"
        assert len(doc) == len(summary) or doc[len(summary)] == " ", f"{name}: {summary!r} cut inside a word"


@pytest.mark.parametrize("name", ["nope", "generat", "--config=x.yaml"])
def test_unknown_command_exits_2_in_one_line(capsys, name):
    with pytest.raises(SystemExit) as e:
        entrypoint.main([name])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: unknown command {name!r}") and err.count("\n") == 1 and "run, pull" in err


# Field docs and docs/config.md -------------------------------------------------------------------

def test_every_config_field_has_a_one_line_docstring():
    for section in sections():
        cls = type(getattr(Config(), section))
        docs = field_docs(cls)
        assert list(docs) == [f.name for f in dataclasses.fields(cls)], section
        for name, doc in docs.items():
            assert doc.strip() and "\n" not in doc, f"{section}.{name}"
        assert config_mod.section_doc(section), section


def test_a_field_without_a_docstring_is_an_error():
    @dataclass(frozen=True)
    class Undocumented:
        documented: int = 1
        """has one"""
        bare: int = 2  # a comment is not a docstring
        last: str = ""

    with pytest.raises(ValueError, match="Undocumented: fields without a docstring: bare, last"):
        field_docs(Undocumented)


def test_docs_config_md_is_current():
    path = ROOT / "docs" / "config.md"
    assert path.is_file(), "docs/config.md is missing: python entrypoint.py config-docs > docs/config.md"
    assert path.read_text(encoding="utf-8") == markdown(), \
        "docs/config.md is out of date: python entrypoint.py config-docs > docs/config.md"


def test_config_md_documents_every_key_with_its_default(capsys):
    md = help_of(capsys, "config-docs")
    assert md == markdown()
    rows = {line.split(" | ")[0][3:-1]: line for line in md.splitlines() if line.startswith("| `")}
    assert sorted(rows) == sorted(all_keys())
    assert "| `train.batch_tokens` | int | `8192` | global batch in tokens" in rows["train.batch_tokens"]
    assert "`cosine \\| wsd \\| multistep`" not in md and "cosine \\| wsd \\| multistep" in rows["train.schedule"]
    assert "(environment: `RUN_ID`)" in rows["run.id"]
    assert "\\<bucket>/runs/\\<id>/" in rows["run.id"]  # not swallowed as an HTML tag


# What a command prints at start ------------------------------------------------------------------

def test_summary_names_the_run_and_only_the_changed_keys():
    cfg = load_config(None, {"run.id": "x1", "train.max_steps": 50, "data.sources": ["a.jsonl", "b"],
                             "sample.prompts": ["春"]}, env={})
    text = config_mod.summary(cfg)
    lines = text.splitlines()
    assert lines[0] == "config: run.id=x1 storage.bucket=./bucket model.preset=tiny"
    assert 'data.sources=["a.jsonl", "b"]' in text and "train.max_steps=50" in text and 'sample.prompts=["春"]' in text
    assert "train.lr" not in text and "run.id=x1" not in "".join(lines[1:])
    assert len(lines) <= 3
    assert config_mod.summary(load_config(None, {}, env={})).splitlines()[1] == "set: (all defaults)"


def test_a_stage_prints_the_summary_not_the_whole_config(capsys, monkeypatch, tmp_path):
    overrides = {"storage.local_dir": str(tmp_path / "work"), "train.max_steps": 30}
    cfg = entrypoint._config(None, overrides)
    out = capsys.readouterr().out
    assert out == config_mod.summary(cfg) + "\n"
    assert "train.max_steps=30" in out and "# resolved config" not in out
    monkeypatch.setenv("RANK", "1")  # one summary per job, from rank 0
    entrypoint._config(None, overrides)
    assert capsys.readouterr().out == ""


def test_config_command_prints_the_full_resolved_config(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  id: shown\ntrain:\n  max_steps: 40\n", encoding="utf-8")
    out = help_of(capsys, "config", f"--config={path}", "--train.lr=0.002")
    tree = yaml.safe_load(out)
    assert tree == to_dict(load_config(str(path), {"train.lr": 0.002}, env={}))
    assert (tree["run"]["id"], tree["train"]["max_steps"], tree["train"]["lr"]) == ("shown", 40, 0.002)


TORCH_FREE = [["plan", "--gpu_hours", "8"], ["plan", "--gpu_hours", "0.05", "--corpus_tokens", "1e6"], ["config"],
              ["config-docs"], ["status"], *[[name, "--help"] for name in entrypoint.COMMANDS], ["--help"]]


@pytest.mark.parametrize("args", TORCH_FREE, ids=" ".join)
def test_commands_that_need_no_gpu_import_no_torch(tmp_path, args):
    """They start in well under a second because torch is never imported (python -X importtime
    lists every module a process imports); a timed assertion would only measure the machine."""
    p = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "entrypoint.py"), *args], cwd=tmp_path,
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert "trainer.config.load" in imported  # the listing was read
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers", "numpy"))
    assert heavy == []
