"""Config: layers in order (defaults < YAML < environment < overrides), types, and every problem at once."""

import pytest
import yaml

from trainer.config import ENV_KEYS, Config, ConfigError, from_dict, load_config, to_dict, to_yaml


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
    assert from_dict(to_dict(cfg)) == cfg
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    assert load_config(str(path), {}, env={}) == cfg


def test_cli_reports_bad_keys_and_exits_2(tmp_path, capsys):
    import entrypoint

    with pytest.raises(SystemExit) as e:
        entrypoint.main(["status", f"--storage.bucket={tmp_path}", "--train.max_stepz=3", "--train.lr=2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "train.max_stepz: unknown key" in err and "train.lr: must be in (0, 1)" in err
