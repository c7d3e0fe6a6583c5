"""The commands as people start them: one training process is `python -m trainer.training.worker`
(torchrun's command line), not an `entrypoint.py` command; `zh-pretrain` is the installed CLI and
finds the bundled configs by name without a checkout."""

import importlib.metadata
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

import entrypoint
from faults import job_main, worker_args
from trainer.config import to_yaml
from trainer.io.artifacts import Artifacts

try:
    import tomllib
except ModuleNotFoundError:  # python 3.10
    import tomli as tomllib


def test_worker_is_not_an_entrypoint_command(capsys):
    assert "worker" not in entrypoint.COMMANDS
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["worker", "--config=c.yaml", "--artifacts=a.json"])
    assert e.value.code == 2 and "unknown command 'worker'" in capsys.readouterr().err


def test_the_tests_start_a_training_process_as_torchrun_does(monkeypatch, tmp_path):
    """faults.worker_args is `python -m trainer.training.worker --stage=pretrain ...`, and job_main
    (the zygote's and kill-at's runner) hands it to the module's own parser."""
    from trainer.config import load_config
    from trainer.training import worker

    seen = {}
    monkeypatch.setattr(worker, "pretrain_worker",
                        lambda cfg, arts, init=None: seen.update(cfg=cfg, arts=arts, init=init))
    config = tmp_path / "c.yaml"
    config.write_text(to_yaml(load_config(None, {"run.id": "w1", "train.max_steps": 30}, env={})), encoding="utf-8")
    args = worker_args(config, {"tokenizer_key": "tok/k", "data_key": "data/k"}, tmp_path)
    assert args[:3] == ["-m", "trainer.training.worker", "--stage=pretrain"]
    job_main(args)
    assert (seen["cfg"].run.id, seen["cfg"].train.max_steps) == ("w1", 30)
    assert seen["arts"] == Artifacts("tok/k", "data/k") and seen["init"] is None  # no model.init: no --init


# The console script ------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_zh_pretrain_is_the_installed_cli(capsys):
    """pyproject's [project.scripts] zh-pretrain = entrypoint:main, as this (editable) venv installed it
    (a venv from before the script: pip install -e . again)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"zh-pretrain": "entrypoint:main"}
    (ep,) = importlib.metadata.entry_points(group="console_scripts", name="zh-pretrain")
    assert ep.value == "entrypoint:main" and ep.load() is entrypoint.main
    ep.load()(["--help"])  # returns: exit status 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and all(f"  {name} " in out for name in entrypoint.COMMANDS)
    script = Path(sys.executable).parent / "zh-pretrain"
    r = subprocess.run([str(script), "status", "--help"], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: zh-pretrain status") and "--storage.bucket=" in r.stdout


def test_the_bundled_configs_are_installed_with_the_package():
    """A non-editable install carries configs/*.yaml to <prefix>/share/zh-pretrain/configs, where
    entrypoint.bundled_configs looks."""
    files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    assert files == {"share/zh-pretrain/configs": ["configs/*.yaml"]}
    assert {p.name for p in (ROOT / "configs").glob("*.yaml")} >= {"demo.yaml", "tiny.yaml", "sft-demo.yaml"}
    installed = Path(sysconfig.get_path("data")) / "share" / "zh-pretrain" / "configs"
    assert installed in entrypoint.bundled_configs()


def test_config_names_a_bundled_config_from_anywhere(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONFIG", raising=False)
    checkout = ROOT / "configs"
    assert entrypoint.config_path("demo") == str(checkout / "demo.yaml")
    assert entrypoint.config_path("configs/tiny.yaml") == str(checkout / "tiny.yaml")
    for given in (None, "nope", "configs/nope.yaml", str(tmp_path / "elsewhere" / "demo.yaml"), "sub/demo.yaml"):
        assert entrypoint.config_path(given) == given  # load_config says it is not there
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("run:\n  id: mine\n", encoding="utf-8")
    assert entrypoint.config_path("configs/demo.yaml") == "configs/demo.yaml"  # the user's own file wins
    installed = tmp_path / "prefix" / "share" / "zh-pretrain" / "configs"
    installed.mkdir(parents=True)
    (installed / "tiny.yaml").write_text("run:\n  id: from-share\n", encoding="utf-8")
    monkeypatch.setattr(entrypoint, "bundled_configs", lambda: [tmp_path / "no-checkout", installed])
    assert entrypoint.config_path("tiny") == str(installed / "tiny.yaml")
    entrypoint.main(["config", "--config=tiny"])
    assert yaml.safe_load(capsys.readouterr().out)["run"]["id"] == "from-share"


# An override typed without its leading -- --------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("word", ["train.max_steps=3", "model.preset=tiny", "storage.bucket=/elsewhere"])
def test_an_override_without_dashes_exits_2_before_any_work(capsys, tmp_path, word):
    """python-fire ran the whole command without such a word, then failed on it (exit 2 at the end of
    a run); now nothing starts and the line says what was meant."""
    bucket = tmp_path / "bucket"
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["run", "--config=demo", f"--storage.bucket={bucket}",
                         f"--storage.local_dir={tmp_path / 'work'}", word])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1] == f"error: {word}: an override needs a leading -- (--{word})"
    assert list(tmp_path.iterdir()) == []  # no bucket, no work folder: nothing ran


def test_an_override_without_dashes_in_a_process_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "entrypoint.py"), "run", "--config", "demo",
                        "train.lr=0.002"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last == "error: train.lr=0.002: an override needs a leading -- (--train.lr=0.002)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["--train.lr=0.002"], ["--train.lr", "0.002"]])
def test_both_flag_forms_still_reach_the_config(capsys, args):
    entrypoint.main(["config", "--config=demo", *args])
    assert yaml.safe_load(capsys.readouterr().out)["train"]["lr"] == 0.002


@pytest.mark.parametrize("args, bare", [
    (["generate", "ckpt", "checkpoint=x"], ["checkpoint=x"]),  # the command's own parameter
    (["generate", "ckpt", "--prompt", "train.lr=3"], []),  # a flag's value, whatever it holds
    (["generate", "ckpt", "--prompt=a", "a=b"], []),  # not a config key nor a parameter: fire's to judge
    (["generate", "s3://b/runs/x=1/final"], []),  # a path with = in it
    (["config", "sample.top_k=5", "--train.lr=0.1"], ["sample.top_k=5"]),
])
def test_only_config_keys_and_parameters_count_as_overrides(args, bare):
    assert entrypoint.unflagged_overrides(args) == bare
