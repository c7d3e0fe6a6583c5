"""`entrypoint.py plan`: the JSON it prints agrees with DeepSeek LLM's fits (arXiv 2401.02954,
eqs. 1, 2 and 4) up to the rounding trainer/model/planner.py documents, --out writes a config `run`
accepts, and bad input exits 2 naming the argument."""

import json
import math

import pytest
import yaml

import entrypoint
from trainer.config import load_config
from trainer.model.llama import PEAK_FLOPS, PRESETS

CONFIG_ENV = ("CONFIG", "RUN_ID", "BUCKET", "LOCAL_DIR", "AWS_ENDPOINT_URL", "AWS_REGION")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in CONFIG_ENV:  # the planned config must not pick up this machine's settings
        monkeypatch.delenv(name, raising=False)


def plan_json(capsys, *args: str) -> dict:
    entrypoint.main(["plan", *args, "--json"])
    return json.loads(capsys.readouterr().out)


def exits_bad_input(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["plan", *args])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def deepseek_m(n_layer: int, d_model: int, seq_len: int) -> float:
    """M = 72 n_layer d^2 + 12 n_layer d seq_len (DeepSeek LLM eq. 2)."""
    return 72.0 * n_layer * d_model ** 2 + 12.0 * n_layer * d_model * seq_len


def check_against_fits(p: dict, seq_len: int = 1024, gpus: int = 1):
    """What plan_json promises, checked from the definitions: batch = B_opt rounded to whole
    sequences per GPU, lr = lr_opt to three significant figures, tokens = whole steps of that batch."""
    c = p["compute_budget"]
    b_opt = 0.2920 * c ** 0.3271
    lr_opt = 0.3118 * c ** -0.1250
    unit = seq_len * gpus
    assert p["batch_tokens"] % unit == 0
    # ... into whole micro-batches per GPU, moving it at most 5% (planner.whole_micro_batches)
    assert abs(p["batch_tokens"] - b_opt) <= max(unit / 2, 0.05 * b_opt)
    assert abs(p["lr"] - lr_opt) <= 0.5 * 10 ** (math.floor(math.log10(lr_opt)) - 2)
    assert p["deepseek_optimum"]["batch_tokens"] == pytest.approx(b_opt, rel=1e-9)
    assert p["deepseek_optimum"]["lr"] == pytest.approx(lr_opt, rel=1e-9)
    assert p["deepseek_optimum"]["non_embedding_flops_per_token"] == pytest.approx(0.1715 * c ** 0.5243, rel=1e-9)
    assert p["deepseek_optimum"]["tokens"] == pytest.approx(5.8316 * c ** 0.4757, rel=1e-9)

    model = p["model"]
    shape = PRESETS[model["preset"]]
    assert {k: model[k] for k in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ffn")} == {
        "n_layer": shape.n_layer, "d_model": shape.d_model, "n_head": shape.n_head, "n_kv_head": shape.n_kv_head,
        "d_ffn": shape.d_ffn}
    m = deepseek_m(shape.n_layer, shape.d_model, seq_len)
    assert p["non_embedding_flops_per_token"] == m
    assert p["tokens"] == p["steps"] * p["batch_tokens"]
    assert abs(p["tokens"] - c / m) <= p["batch_tokens"] / 2  # whole steps around the budget's tokens
    assert p["compute"] == pytest.approx(m * p["tokens"])
    assert p["warmup_steps"] == min(2000, int(0.05 * p["steps"]))  # DeepSeek's 2000, capped at 5% of the run
    assert p["seq_len"] == seq_len and p["gpus"] == gpus


def test_compute_budget_json(capsys):
    p = plan_json(capsys, "--compute=1e19")
    for key in ("compute", "non_embedding_flops_per_token", "tokens", "batch_tokens", "lr", "model"):
        assert key in p, key
    assert p["basis"] == "compute" and p["compute_budget"] == pytest.approx(1e19)
    check_against_fits(p)
    # 1e19: B_opt = 0.2920 * 10^(19 * 0.3271) = 478_942 tokens = 467.7 sequences -> 29 micro-batches
    # of 16 = 464 x 1024 = 475_136; lr_opt = 0.3118 * 10^-2.375 = 1.3149e-3 -> 0.00131
    assert p["batch_tokens"] == 464 * 1024 and p["lr"] == 0.00131
    # The preset is the one whose M is nearest (log distance) M_opt = 0.1715 C^0.5243.
    m_opt = 0.1715 * 1e19 ** 0.5243
    m = {k: deepseek_m(s.n_layer, s.d_model, 1024) for k, s in PRESETS.items()}
    nearest = min(PRESETS, key=lambda k: abs(math.log(m[k] / m_opt)))
    assert p["model"]["preset"] == nearest


def test_seq_len_and_gpus_set_the_batch_unit(capsys):
    p = plan_json(capsys, "--compute=3e18", "--seq_len=2048", "--gpus=8")
    check_against_fits(p, seq_len=2048, gpus=8)


def test_table_without_json(capsys):
    entrypoint.main(["plan", "--compute=1e19"])
    out = capsys.readouterr().out
    assert "DeepSeek optimum" in out and "Chinchilla" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_out_writes_a_config_run_accepts(tmp_path, capsys):
    out = tmp_path / "planned.yaml"
    entrypoint.main(["plan", "--compute=1e19", "--json", f"--out={out}"])
    captured = capsys.readouterr()
    p = json.loads(captured.out)  # stdout stays pure JSON; the note about the file goes to stderr
    assert str(out) in captured.err
    cfg = load_config(str(out), {}, env={})
    assert cfg.model.preset == p["model"]["preset"]
    assert cfg.train.max_steps == p["steps"]
    assert cfg.train.lr == p["lr"]
    assert cfg.train.batch_tokens == p["batch_tokens"] and cfg.train.seq_len == p["seq_len"] == 1024
    assert cfg.train.warmup_steps == p["warmup_steps"]
    assert yaml.safe_load(out.read_text())["model"]["preset"] == p["model"]["preset"]


def test_out_keeps_the_rest_of_config(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("run:\n  id: mine\ntokenizer:\n  vocab_size: 8000\ntrain:\n  schedule: wsd\n")
    out = tmp_path / "planned.yaml"
    entrypoint.main(["plan", "--preset=124m", "--json", f"--config={base}", f"--out={out}"])
    p = json.loads(capsys.readouterr().out)
    cfg = load_config(str(out), {}, env={})
    assert (cfg.tokenizer.vocab_size, cfg.train.schedule) == (8000, "wsd")
    assert cfg.run.id.startswith("124m-")  # a run of its own, not base's "mine" (tests/test_cli_errors.py)
    assert cfg.model.preset == "124m" == p["model"]["preset"] and cfg.train.max_steps == p["steps"]


def test_gpu_hours_budget(capsys):
    p = plan_json(capsys, "--gpu_hours=8", "--gpu=h100")
    assert p["basis"] == "gpu_hours" and p["gpu"] == "h100" and p["mfu"] == 0.4
    check_against_fits(p)
    # 8 GPU-hours at 40% of 989 TFLOP/s, counted in the FLOPs the GPU executes (lm_head included).
    hw_flops = 8 * 3600 * PEAK_FLOPS["h100"] * 0.4
    f = p["train_flops_per_token"]
    assert abs(p["tokens"] * f - hw_flops) <= p["batch_tokens"] / 2 * f  # whole steps around the budget
    assert p["gpu_hours"] == pytest.approx(8, rel=p["batch_tokens"] / p["tokens"])
    assert p["wall_hours"] == pytest.approx(p["gpu_hours"])  # one GPU
    four = plan_json(capsys, "--gpu_hours=8", "--gpu=h100", "--gpus=4")
    assert four["wall_hours"] == pytest.approx(four["gpu_hours"] / 4)


def test_gpu_named_by_a_number(capsys):
    """fire reads `--gpu=4090` as an int; the planner must still find the RTX 4090."""
    p = plan_json(capsys, "--gpu_hours=8", "--gpu=4090")
    assert p["gpu"] == "4090"
    assert p["wall_hours"] == pytest.approx(
        p["tokens"] * p["train_flops_per_token"] / (PEAK_FLOPS["4090"] * 0.4) / 3600)


@pytest.mark.parametrize("args, named", [
    (["--compute=-1e19"], "compute"),
    (["--compute=0"], "compute"),
    (["--gpu_hours=-8"], "gpu_hours"),
    (["--gpu_hours=8", "--gpu=tpu9"], "gpu"),
    (["--compute=1e19", "--gpu_hours=8"], "compute"),
    (["--compute=1e19", "--mfu=1.5"], "mfu"),
    (["--compute=1e19", "--seq_len=4"], "seq_len"),
    (["--compute=1e19", "--preset=huge"], "preset"),
    ([], "compute"),  # no budget, no preset, no tokens: nothing to plan
])
def test_bad_input_exits_2_naming_the_argument(capsys, args, named):
    err = exits_bad_input(capsys, *args)
    assert err.startswith(f"error: plan: {named}"), err
    if "--gpu=tpu9" in args:
        assert "tpu9" in err and "h100" in err  # what was given and what is allowed


def test_out_is_not_written_when_the_base_config_is_missing(tmp_path, capsys):
    out = tmp_path / "planned.yaml"
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["plan", "--compute=1e19", f"--config={tmp_path / 'missing.yaml'}", f"--out={out}"])
    assert e.value.code == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert not out.exists()


def test_7b_on_8_h100_writes_a_sharded_config_run_accepts(tmp_path, capsys):
    out = tmp_path / "planned.yaml"
    entrypoint.main(["plan", "--preset=7b", "--gpu=h100", "--gpus=8", "--json", f"--out={out}"])
    p = json.loads(capsys.readouterr().out)
    assert (p["strategy"], p["fits"], p["activation_checkpointing"]) == ("fsdp", True, False)
    assert p["micro_batch_size"] in (16, 8, 4, 2, 1) and p["memory_gb_per_gpu"] <= p["gpu_memory_gb"] == 80
    cfg = load_config(str(out), {}, env={})  # validated: raises on any bad key or value
    assert cfg.model.preset == "7b" and cfg.train.strategy == "fsdp"
    assert cfg.train.micro_batch_size == p["micro_batch_size"]


def test_7b_on_one_4090_table_names_the_gpus_it_needs(capsys):
    entrypoint.main(["plan", "--preset=7b", "--gpu=4090"])
    out = capsys.readouterr().out
    assert "warning: 7b does not fit on 1 x 4090" in out and "at least 8 x 4090" in out
