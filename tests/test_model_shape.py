"""Model shapes beyond the presets (issue 25): model.n_layer, model.d_model, model.n_head,
model.n_kv_head and model.d_ffn override a preset's numbers. A bad shape is refused with one line
naming its key (exit 2, nothing written); a custom shape trains, exports with its numbers and
refuses a resume on another shape; a plain preset's recorded inputs are what they were, so older
checkpoints resume; `plan` counts the custom shape's parameters, FLOPs and memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import entrypoint
from trainer.config import PRESETS, ConfigError, Shape, load_config, model_shape
from trainer.model.llama import GPU_MEMORY_GB, n_params
from trainer.state import protocol

ROOT = Path(__file__).resolve().parent.parent
CONFIG_ENV = ("CONFIG", "RUN_ID", "BUCKET", "LOCAL_DIR", "AWS_ENDPOINT_URL", "AWS_REGION")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in CONFIG_ENV:  # neither the configs nor the plans may pick up this machine's settings
        monkeypatch.delenv(name, raising=False)


def refused_by_cli(capsys, tmp_path, command: str, *flags: str) -> str:
    """Run `command` with flags in-process: it must exit 2 with nothing on stdout and nothing
    written under tmp_path; returns stderr."""
    storage = [f"--storage.bucket={tmp_path / 'bucket'}", f"--storage.local_dir={tmp_path / 'work'}"]
    with pytest.raises(SystemExit) as e:
        entrypoint.main([command, *storage, *flags])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and list(tmp_path.iterdir()) == []
    return captured.err


# Each bad shape, alone: one problem line naming the key that was set, and the siblings it needs.
BAD = [
    ({"model.n_layer": -1}, "model.n_layer", ["must be 0 (the preset's) or a positive number", "-1"]),
    ({"model.d_model": -64}, "model.d_model", ["must be 0 (the preset's) or a positive number"]),
    ({"model.n_head": -4}, "model.n_head", ["must be 0 (the preset's) or a positive number"]),
    ({"model.n_kv_head": -2}, "model.n_kv_head", ["must be 0 (the preset's) or a positive number"]),
    ({"model.d_ffn": -192}, "model.d_ffn", ["must be 0 (the preset's) or a positive number"]),
    # tiny: d_model 64, 4 heads, 4 kv heads
    ({"model.d_model": 66}, "model.d_model", ["model.d_model must be a multiple of model.n_head",
                                              "model.d_model=66", "model.n_head=4 from preset tiny"]),
    ({"model.n_head": 5, "model.n_kv_head": 5}, "model.n_head",
     ["model.d_model must be a multiple of model.n_head", "model.n_head=5", "model.d_model=64 from preset tiny"]),
    ({"model.d_model": 20}, "model.d_model", ["head size model.d_model / model.n_head = 5 must be even", "RoPE"]),
    ({"model.d_model": 40, "model.n_head": 8}, "model.d_model", ["head size model.d_model / model.n_head = 5"]),
    ({"model.n_kv_head": 3}, "model.n_kv_head", ["model.n_head must be a multiple of model.n_kv_head",
                                                 "model.n_kv_head=3", "model.n_head=4 from preset tiny"]),
    ({"model.n_head": 2}, "model.n_head", ["model.n_head must be a multiple of model.n_kv_head",
                                           "model.n_kv_head=4 from preset tiny", "model.n_head=2"]),
    ({"model.n_kv_head": 8}, "model.n_kv_head", ["model.n_head must be a multiple of model.n_kv_head"]),
]


@pytest.mark.parametrize("overrides, key, needles", BAD, ids=[" ".join(f"{k}={v}" for k, v in b[0].items())
                                                              for b in BAD])
def test_a_bad_shape_is_one_line_naming_its_key(overrides, key, needles):
    with pytest.raises(ConfigError) as e:
        load_config(None, {"model.preset": "tiny", **overrides}, env={})
    problems = str(e.value).splitlines()[1:]
    assert len(problems) == 1, problems
    assert problems[0].strip().startswith(f"{key}: "), problems
    assert all(n in problems[0] for n in needles), problems[0]


@pytest.mark.parametrize("command", ["config", "run"])
def test_a_bad_shape_exits_2_through_the_cli_with_nothing_written(capsys, tmp_path, command):
    err = refused_by_cli(capsys, tmp_path, command, "--model.preset=tiny", "--model.n_kv_head=3")
    assert err.startswith("error: invalid configuration:") and "\n  model.n_kv_head: " in err


def test_every_problem_of_a_shape_is_reported_at_once():
    with pytest.raises(ConfigError) as e:  # 124m: d_model 768, 12 heads, 12 kv heads
        load_config(None, {"model.preset": "124m", "model.n_head": 7, "model.n_layer": -2}, env={})
    problems = [p.strip().split(":")[0] for p in str(e.value).splitlines()[1:]]
    assert problems == ["model.n_layer"]  # a negative number first: the shape it would make is no shape
    with pytest.raises(ConfigError) as e:
        load_config(None, {"model.preset": "124m", "model.n_head": 7}, env={})
    problems = [p.strip().split(":")[0] for p in str(e.value).splitlines()[1:]]
    assert problems == ["model.n_head", "model.n_head"]  # 768 is no multiple of 7, nor 7 of 12 kv heads


def test_the_shape_is_the_presets_with_the_numbers_set():
    cfg = load_config(None, {"model.preset": "1b", "model.n_layer": 30, "model.d_ffn": 6144}, env={})
    assert model_shape(cfg.model) == Shape(n_layer=30, d_model=2048, n_head=16, n_kv_head=8, d_ffn=6144)
    assert model_shape(load_config(None, {"model.preset": "1b"}, env={}).model) == PRESETS["1b"]


def test_a_plain_presets_recorded_model_is_unchanged_so_old_checkpoints_resume():
    """LoopState.inputs["model"] as checkpoints recorded it before shapes could be overridden."""
    from trainer.training.tasks import pretrain_inputs

    def model(**overrides) -> str:
        cfg = load_config(None, {"model.preset": "tiny", **overrides}, env={})
        return pretrain_inputs(cfg, "tok", "data-x", 320)["model"]

    assert model() == "tiny, vocab 320, tied embeddings False"
    assert model(**{"model.n_layer": 2, "model.d_ffn": 192}) == model()  # tiny's own numbers: the same weights
    assert model(**{"model.n_layer": 3, "model.n_kv_head": 2}) == "tiny n_layer=3 n_kv_head=2, vocab 320, " \
                                                                  "tied embeddings False"


# Training with a custom shape --------------------------------------------------------------------

def test_a_custom_shape_trains_exports_its_numbers_and_refuses_another_on_resume(tmp_path, tiny_config, cli):
    custom = {"run.id": "shaped", "model.n_layer": 3, "model.n_kv_head": 2, "train.max_steps": 4}
    cfg = tiny_config(tmp_path, custom)
    path = cli.write_config(cfg, tmp_path / "shaped.yaml")
    first = cli.run("run", path)
    assert first.returncode == 0, first.stdout[-4000:]
    store = cfg_store(cfg)
    hf = json.loads(store.read_text("runs/shaped/final/config.json"))
    assert (hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"],
            hf["intermediate_size"], hf["max_position_embeddings"]) == (3, 64, 4, 2, 192, cfg.train.seq_len)
    card = store.read_text("runs/shaped/final/README.md")
    assert "preset `tiny with model.n_layer=3, model.n_kv_head=2`" in card
    assert "| model | tiny with model.n_layer=3, model.n_kv_head=2 |" in store.read_text("runs/shaped/report/report.md")
    step = f"{protocol.checkpoints_prefix('shaped')}/{protocol.step_name(4)}"
    state = json.loads(store.read_text(f"{step}/trainer_state.json"))
    assert state["inputs"]["model"].startswith("tiny n_layer=3 n_kv_head=2, vocab ")

    checkpoints = [o.key for o in store.list(protocol.checkpoints_prefix("shaped"))]
    metrics = store.read_bytes("runs/shaped/metrics.jsonl")
    again = cli.run("run", path, {"model.n_layer": 4, "train.max_steps": 8})
    assert again.returncode == 2, again.stdout[-4000:]
    assert "run.id=shaped: step-00000004 was trained on other inputs (model: tiny n_layer=3 n_kv_head=2, vocab" \
           in again.stdout and "-> tiny n_layer=4 n_kv_head=2, vocab" in again.stdout, again.stdout[-4000:]
    assert [o.key for o in store.list(protocol.checkpoints_prefix("shaped"))] == checkpoints  # nothing trained
    assert store.read_bytes("runs/shaped/metrics.jsonl") == metrics


def cfg_store(cfg):
    from trainer.io.storage import open_storage

    return open_storage(cfg.storage.bucket)


# plan ---------------------------------------------------------------------------------------------

def plan_json(capsys, *args: str) -> dict:
    entrypoint.main(["plan", *args, "--json"])
    return json.loads(capsys.readouterr().out)


def test_plan_counts_a_custom_shape_from_flags(capsys):
    shape = Shape(n_layer=16, d_model=768, n_head=12, n_kv_head=4, d_ffn=2048)
    p = plan_json(capsys, "--preset=124m", "--model.n_layer=16", "--model.n_kv_head=4")
    model = p["model"]
    assert {k: model[k] for k in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ffn")} == vars(shape)
    assert model["params"] == n_params(shape, model["vocab_size"])["total"] != n_params(PRESETS["124m"],
                                                                                       model["vocab_size"])["total"]
    assert model["overrides"] == {"n_layer": 16, "n_kv_head": 4}
    assert model["name"] == "124m with model.n_layer=16, model.n_kv_head=4"
    # DeepSeek LLM's M (eq. 2) of 16 layers, not of 124m's 12
    assert p["non_embedding_flops_per_token"] == 72.0 * 16 * 768 ** 2 + 12.0 * 16 * 768 * p["seq_len"]
    assert p["basis"] == "preset"


def test_plan_counts_a_configs_custom_shape_and_out_writes_it(capsys, tmp_path):
    """1b with twice its layers on 8 H100s: its memory, not 1b's, is counted; --out runs that shape."""
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  preset: 1b\n  n_layer: 48\ntokenizer:\n  vocab_size: 8000\n", encoding="utf-8")
    out = tmp_path / "planned.yaml"
    p = plan_json(capsys, "--gpu=h100", "--gpus=8", "--tokens=2e10", f"--config={base}", f"--out={out}")
    plain = plan_json(capsys, "--gpu=h100", "--gpus=8", "--tokens=2e10", "--preset=1b")
    shape = Shape(n_layer=48, d_model=2048, n_head=16, n_kv_head=8, d_ffn=5632)
    assert p["model"]["n_layer"] == 48 and p["model"]["params"] == n_params(shape, p["model"]["vocab_size"])["total"]
    assert p["memory_gb_per_gpu"] > plain["memory_gb_per_gpu"] and p["gpu_memory_gb"] == GPU_MEMORY_GB["h100"]
    cfg = load_config(str(out), {}, env={})
    assert model_shape(cfg.model) == shape and cfg.tokenizer.vocab_size == 8000
    assert cfg.train.max_steps == p["steps"] and cfg.train.micro_batch_size in (0, p["micro_batch_size"])
    assert yaml.safe_load(out.read_text())["model"]["n_layer"] == 48


def test_plan_without_a_custom_shape_still_chooses_the_preset(capsys, tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  preset: 7b\n", encoding="utf-8")
    out = tmp_path / "planned.yaml"
    p = plan_json(capsys, "--compute=1e19", f"--config={base}", f"--out={out}")
    assert p["basis"] == "compute" and p["model"]["overrides"] == {}
    cfg = load_config(str(out), {}, env={})
    assert cfg.model.preset == p["model"]["preset"] and model_shape(cfg.model) == PRESETS[p["model"]["preset"]]


@pytest.mark.parametrize("flags, named", [
    (["--preset=tiny", "--model.n_head=5", "--model.n_kv_head=5"], "model.n_head: "),
    (["--preset=124m", "--model.n_layer=-1"], "model.n_layer: "),
    (["--preset=tiny", "--train.lr=0.1"], "plan --train.lr: "),
    (["--preset=tiny", "--model.preset=124m"], "plan --model.preset: "),
])
def test_plan_refuses_a_bad_shape_naming_the_key(capsys, tmp_path, flags, named):
    out = tmp_path / "planned.yaml"
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["plan", *flags, f"--out={out}"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and named in captured.err and not out.exists()


def test_plan_to_config_writes_the_planned_shape_over_the_bases():
    """The base's numbers never run on a preset the plan chose without them (0: the preset's)."""
    from trainer.config import to_dict
    from trainer.model.plan_output import plan_to_config
    from trainer.model.planner import plan

    base = to_dict(load_config(None, {"model.preset": "124m", "model.n_layer": 16}, env={}))
    tree = plan_to_config(plan(preset="350m"), base)
    assert tree["model"]["preset"] == "350m" and tree["model"]["n_layer"] == 0
    custom = Shape(n_layer=16, d_model=768, n_head=12, n_kv_head=12, d_ffn=2048)
    tree = plan_to_config(plan(preset="124m", shape=custom), base)
    assert model_shape(load_config(None, {f"model.{k}": v for k, v in tree["model"].items()}, env={}).model) == custom


def test_plan_of_a_custom_shape_imports_no_torch(tmp_path):
    """As tests/test_cli_help.py checks for plain plans: the config and the planner need no torch."""
    p = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "entrypoint.py"), "plan", "--preset=tiny",
                        "--model.n_layer=3"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert "trainer.config.load" in imported
    assert sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers", "numpy")) == []


def test_status_names_a_custom_shape():
    from trainer.job.status import base_model

    saved = {"run": {"id": "r"}, "model": {"preset": "tiny", "n_layer": 3, "d_model": 0, "n_kv_head": 2}}
    assert base_model(None, saved, "r") == "pretrain of model.preset tiny with model.n_layer=3, model.n_kv_head=2"
    assert base_model(None, {"run": {"id": "r"}, "model": {"preset": "tiny"}}, "r") == "pretrain of model.preset tiny"
