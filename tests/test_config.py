"""Config: layers in order (defaults < YAML < environment < overrides), types, and every problem at once."""

import pytest
import yaml

from trainer.config import ENV_KEYS, Config, ConfigError, load_config, load_config_tree, to_dict, to_yaml


def write_yaml(path, tree: dict):
    path.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return str(path)


def test_defaults_without_file_or_environment():
    cfg = load_config(None, {}, env={})
    assert cfg == Config()


def test_every_problem_is_reported_at_once_with_its_key():
    overrides = {
        "train.max_stepz": 5,  # unknown key
        "nosection.x": 1,  # unknown section
        "train.lr": "fast",  # wrong type
        "train.compile": True,  # wrong type (a string choice)
        "train.seq_len": 4,  # bad value
        "model.preset": "huge",  # bad value
        "data.on_error": "ignore",  # not one of the choices
    }
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, env={})
    msg = str(e.value)
    for key in overrides:
        assert key in msg, f"{key} missing from:\n{msg}"
    assert "unknown key" in msg and "unknown section" in msg
    assert len(msg.splitlines()) == 1 + len(overrides)  # header + one line per problem


def test_relations_between_keys_are_checked():
    with pytest.raises(ConfigError, match=r"train\.batch_tokens: must be a positive multiple of train\.seq_len"):
        load_config(None, {"train.seq_len": 64, "train.batch_tokens": 100}, env={})
    with pytest.raises(ConfigError, match=r"train\.warmup_steps"):
        load_config(None, {"train.max_steps": 10, "train.warmup_steps": 10}, env={})


def test_yaml_then_overrides(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"run": {"id": "from-yaml"}, "train": {"max_steps": 100, "lr": 3e-4},
                                            "data": {"sources": ["a.jsonl", "s3://b/c/*.zst"]}})
    cfg = load_config(path, {"train.max_steps": 200}, env={})
    assert cfg.train.max_steps == 200  # override beats YAML
    assert cfg.run.id == "from-yaml"  # YAML beats default
    assert cfg.train.lr == 3e-4
    assert cfg.data.sources == ("a.jsonl", "s3://b/c/*.zst")
    assert cfg.train.seq_len == Config().train.seq_len  # default where nothing set it


def test_yaml_exponent_floats_are_numbers(tmp_path):
    # PyYAML reads `3e-4` (no dot) as a string; a learning rate written that way must still load.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n  min_lr_ratio: 1e-1\n")
    cfg = load_config(str(path), {}, env={})
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.min_lr_ratio == pytest.approx(0.1)


def test_bad_yaml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"), {}, env={})
    path = write_yaml(tmp_path / "c.yaml", {"train": 5, "run": {"idd": "x"}})
    with pytest.raises(ConfigError) as e:
        load_config(path, {}, env={})
    assert "train: expected a mapping" in str(e.value) and "run.idd: unknown key" in str(e.value)


def test_environment_between_yaml_and_overrides(tmp_path):
    assert set(ENV_KEYS.values()) >= {"run.id", "storage.bucket", "storage.endpoint_url", "storage.local_dir"}
    path = write_yaml(tmp_path / "c.yaml", {"run": {"id": "from-yaml"}, "storage": {"bucket": "/yaml/bucket"}})
    env = {"RUN_ID": "from-env", "BUCKET": "s3://env-bucket/p", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
           "LOCAL_DIR": "/scratch", "AWS_REGION": "eu-west-1", "UNRELATED": "x"}
    cfg = load_config(path, {}, env=env)
    assert cfg.run.id == "from-env" and cfg.storage.bucket == "s3://env-bucket/p"
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000" and cfg.storage.local_dir == "/scratch"
    assert cfg.storage.region == "eu-west-1"
    cfg = load_config(path, {"run.id": "from-cli"}, env=env)
    assert cfg.run.id == "from-cli" and cfg.storage.bucket == "s3://env-bucket/p"
    # An empty variable does not count as set (compose files pass empty defaults).
    assert load_config(path, {}, env={"RUN_ID": ""}).run.id == "from-yaml"


def test_bad_value_from_environment_names_its_source():
    with pytest.raises(ConfigError, match=r"run\.id"):
        load_config(None, {}, env={"RUN_ID": "has spaces"})


@pytest.mark.parametrize("raw, expected", [
    ("a.jsonl", ("a.jsonl",)),  # one string is a one-item list
    ("[a.jsonl, 's3://b/x/*.jsonl.zst']", ("a.jsonl", "s3://b/x/*.jsonl.zst")),  # a YAML list as a string
    (["x", "y"], ("x", "y")),  # a list (fire parses --data.sources=[x,y] into one)
    (("x",), ("x",)),
])
def test_sources_list_parsing(raw, expected):
    assert load_config(None, {"data.sources": raw}, env={}).data.sources == expected


def test_strings_from_the_command_line_are_typed():
    cfg = load_config(None, {"train.max_steps": "50", "train.lr": "0.01", "checkpoint.upload_async": "false",
                             "run.id": "123"}, env={})
    assert cfg.train.max_steps == 50 and cfg.train.lr == 0.01 and cfg.checkpoint.upload_async is False
    assert cfg.run.id == "123"  # a str field keeps digits as text


def test_empty_source_list_is_an_error():
    with pytest.raises(ConfigError, match=r"data\.sources: must list at least one"):
        load_config(None, {"data.sources": []}, env={})


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, {"run.id": "r", "train.lr": 0.002, "data.sources": ["a", "b"]}, env={})
    assert load_config_tree(to_dict(cfg)) == cfg
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    assert load_config(str(path), {}, env={}) == cfg


def test_cli_reports_bad_keys_and_exits_2(tmp_path, capsys):
    import entrypoint

    with pytest.raises(SystemExit) as e:
        entrypoint.main(["status", f"--storage.bucket={tmp_path}", "--train.max_stepz=3", "--train.lr=2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "train.max_stepz: unknown key" in err and "train.lr: must be in (0, 1)" in err


# Every value written in a config reaches the run, or is refused (issue 23) -------------------------

def test_preset_choices_are_the_model_presets():
    import typing

    from trainer.config import Preset
    from trainer.model.llama import PRESETS

    assert list(typing.get_args(Preset)) == list(PRESETS)


@pytest.mark.parametrize("text, line, key", [
    ("train:\n  lr: 0.0003\n  max_steps: 40\ntrain:\n  seq_len: 64\n", 4, "train"),
    ("train:\n  lr: 0.0003\n  lr: 0.001\n", 3, "train.lr"),
    ("sample:\n  prompts:\n  - a\nrun:\n  id: x\nsample:\n  top_k: 3\n", 6, "sample"),
    ("data:\n  sources:\n  - {path: a, path: b}\n", 3, "data.sources[0].path"),
])
def test_a_duplicate_key_at_any_depth_names_the_file_and_line(tmp_path, text, line, key):
    path = tmp_path / "twice.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(str(path), {}, env={})
    assert str(e.value).startswith(f"{path}:{line}: duplicate key '{key}'")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("written", ["1.10", "1e3", "007", "0x1F", "1_000", "true", "on", "null", "2026-12-02"])
def test_identifiers_stay_exactly_as_written(tmp_path, written):
    path = tmp_path / "ids.yaml"
    path.write_text(f"run:\n  id: {written}\nsft:\n  run_id: {written}\ntokenizer:\n  path: {written}\n"
                    f"sample:\n  prompts: [{written}, x{written}]\n", encoding="utf-8")
    by_file = load_config(str(path), {}, env={})
    by_override = load_config(None, {"run.id": written, "sft.run_id": written, "tokenizer.path": written,
                                     "sample.prompts": f"[{written}, x{written}]"}, env={})
    by_env = load_config(None, {}, env={"RUN_ID": written})
    for cfg in (by_file, by_override):
        assert (cfg.run.id, cfg.sft.run_id, cfg.tokenizer.path) == (written,) * 3
        assert cfg.sample.prompts == (written, f"x{written}")
    assert by_env.run.id == written


def test_choices_are_read_as_written_not_as_yaml_booleans(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  compile: off\n", encoding="utf-8")  # YAML 1.1 reads `off` as false
    assert load_config(str(path), {}, env={}).train.compile == "off"
    assert load_config(None, {"train.compile": "on"}, env={}).train.compile == "on"


def test_a_float_for_a_string_field_is_refused_not_rounded():
    with pytest.raises(ConfigError, match=r"run.id: expected a string"):
        load_config(None, {"run.id": 1.1}, env={})


def test_numbers_still_read_as_numbers(tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text("train:\n  lr: 3e-4\n  max_steps: 40\n  max_epochs: 2\n", encoding="utf-8")
    t = load_config(str(path), {}, env={}).train
    assert (t.lr, t.max_steps, t.max_epochs) == (3e-4, 40, 2.0)


def test_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes("\ufeffrun:\n  id: 中文\n".encode("utf-8"))
    assert load_config(str(path), {}, env={}).run.id == "中文"


@pytest.mark.parametrize("encoding, looks", [("gbk", "GBK/GB18030"), ("utf-16", "UTF-16")])
def test_a_file_that_is_not_utf8_says_what_it_looks_like(tmp_path, encoding, looks):
    path = tmp_path / "notepad.yaml"
    path.write_bytes("run:\n  id: x\nsample:\n  prompts: [床前明月光]\n".encode(encoding))
    with pytest.raises(ConfigError) as e:
        load_config(str(path), {}, env={})
    assert str(e.value) == f"{path}:{4 if encoding == 'gbk' else 1}: not UTF-8 (looks like {looks}); save it as UTF-8"


@pytest.mark.parametrize("make", ["duplicate", "gbk", "float_id"])
def test_config_errors_from_the_cli_are_one_line_exit_2(tmp_path, make):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "c.yaml"
    args = ["config", f"--config={path}"]
    if make == "duplicate":
        path.write_text("train:\n  lr: 0.0003\ntrain:\n  max_steps: 40\n", encoding="utf-8")
    elif make == "gbk":
        path.write_bytes("sample:\n  prompts: [床前明月光]\n".encode("gbk"))
    else:
        path.write_text("train:\n  max_steps: 30\n", encoding="utf-8")
        args.append("--run.id=1.10")
    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, str(root / "entrypoint.py"), *args], capture_output=True, text=True,
                       cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    if make == "float_id":  # fire reads --run.id=1.10 as 1.1; the run keeps the text
        assert p.returncode == 0, p.stderr
        assert yaml.safe_load(p.stdout)["run"]["id"] == "1.10"
        return
    assert (p.returncode, p.stdout) == (2, "")
    assert len(p.stderr.strip().splitlines()) == 1 and str(path) in p.stderr, p.stderr
