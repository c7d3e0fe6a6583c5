"""lr_at(step, cfg) for the three schedules, against values worked out by hand from the definitions
in trainer/model/schedule.py (warmup, half-cosine, MiniCPM's WSD, DeepSeek LLM's multistep)."""

import dataclasses
import math

import pytest

from trainer.config import ConfigError, TrainConfig, load_config
from trainer.model.schedule import lr_at

LR = 1e-3
FLOOR = 1e-4  # LR * min_lr_ratio 0.1


def train_cfg(schedule: str, **kw) -> TrainConfig:
    values = {"schedule": schedule, "lr": LR, "min_lr_ratio": 0.1, "max_steps": 100, "warmup_steps": 10, **kw}
    return dataclasses.replace(TrainConfig(), **values)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "multistep"])
def test_warmup_is_linear_from_lr_over_warmup(schedule):
    cfg = train_cfg(schedule)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # 1e-3 * 1/10: step 0 already learns
    assert lr_at(4, cfg) == pytest.approx(5e-4)  # 1e-3 * 5/10
    assert lr_at(9, cfg) == pytest.approx(1e-3)  # the last warmup step reaches the peak
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # and every schedule starts there


def test_cosine_by_hand():
    cfg = train_cfg("cosine")  # decays over steps 10..100
    # midpoint, step 55: progress 45/90 = 0.5, cos(pi/2) = 0 -> floor + (peak - floor) / 2
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 9e-4 * 0.5)
    # step 100 = max_steps: progress 1 -> the floor, lr * min_lr_ratio
    assert lr_at(100, cfg) == pytest.approx(FLOOR)
    assert lr_at(150, cfg) == pytest.approx(FLOOR)  # stays there past the end
    quarter = train_cfg("cosine", warmup_steps=20)  # step 40: progress 20/80 = 0.25
    assert lr_at(40, quarter) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.sqrt(2) / 2))
    no_floor = train_cfg("cosine", min_lr_ratio=0.0)
    assert lr_at(100, no_floor) == pytest.approx(0.0, abs=1e-15)


def test_wsd_by_hand():
    cfg = train_cfg("wsd", decay_fraction=0.2)  # decay window: the last 20 of 100 steps, 80..100
    for step in (10, 50, 79, 80):
        assert lr_at(step, cfg) == LR, step  # stable, exactly the peak, up to the window's start
    assert lr_at(85, cfg) == pytest.approx(1e-3 - 9e-4 * 5 / 20)  # linear: a quarter of the way down
    assert lr_at(90, cfg) == pytest.approx(5.5e-4)  # halfway between 1e-3 and 1e-4
    assert lr_at(99, cfg) == pytest.approx(1e-3 - 9e-4 * 19 / 20)
    assert lr_at(100, cfg) == pytest.approx(FLOOR)
    wide = train_cfg("wsd", decay_fraction=0.5)  # window 50..100
    assert lr_at(49, wide) == LR and lr_at(75, wide) == pytest.approx(5.5e-4)


def test_multistep_follows_deepseek_llm():
    # DeepSeek LLM (arXiv 2401.02954, 2.3): full lr to 80% of training, 31.6% to 90%, then 10%.
    cfg = train_cfg("multistep", min_lr_ratio=0.5)  # min_lr_ratio plays no part
    assert lr_at(10, cfg) == LR and lr_at(79, cfg) == LR
    assert lr_at(80, cfg) == pytest.approx(3.16e-4)
    assert lr_at(89, cfg) == pytest.approx(3.16e-4)
    assert lr_at(90, cfg) == pytest.approx(1e-3 * 0.316 * 0.316)  # 9.9856e-5, DeepSeek's "10%"
    assert lr_at(99, cfg) == pytest.approx(9.9856e-5)
    big = train_cfg("multistep", max_steps=1000, warmup_steps=100)
    assert lr_at(799, big) == LR and lr_at(800, big) == pytest.approx(3.16e-4)
    assert lr_at(899, big) == pytest.approx(3.16e-4) and lr_at(900, big) == pytest.approx(9.9856e-5)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "multistep"])
def test_never_increases_after_warmup(schedule):
    cfg = train_cfg(schedule, max_steps=300, warmup_steps=30)
    lrs = [lr_at(s, cfg) for s in range(30, 301)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    assert lrs[0] == pytest.approx(LR) and lrs[-1] < LR
    assert all(x > 0 for x in lrs)
    warm = [lr_at(s, cfg) for s in range(30)]
    assert all(b > a for a, b in zip(warm, warm[1:]))  # and rises strictly while warming up


def test_no_warmup_starts_at_peak():
    for schedule in ("cosine", "wsd", "multistep"):
        assert lr_at(0, train_cfg(schedule, warmup_steps=0)) == pytest.approx(LR), schedule


def test_unknown_schedule_raises_naming_the_key():
    with pytest.raises(ValueError, match=r"train\.schedule.*'linear'"):
        lr_at(50, train_cfg("linear"))


def test_load_config_rejects_an_unknown_schedule():
    with pytest.raises(ConfigError, match=r"train\.schedule: 'linear' is not one of cosine, wsd, multistep"):
        load_config(None, {"train.schedule": "linear"}, env={})
    for schedule in ("cosine", "wsd", "multistep"):
        assert load_config(None, {"train.schedule": schedule}, env={}).train.schedule == schedule


def test_load_config_reads_the_schedule_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  schedule: step\n  decay_fraction: 1.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path), {}, env={})
    assert "train.schedule" in str(e.value) and "train.decay_fraction" in str(e.value)  # both, in one error


def test_a_derived_step_count_passed_in_replaces_max_steps():
    """The loop passes the count it derived (budget, epoch cap) instead of writing it into the config."""
    cfg = train_cfg("cosine")  # max_steps 100
    assert lr_at(55, cfg, max_steps=200) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 45 / 190)))
    assert lr_at(55, cfg, max_steps=200) != lr_at(55, cfg)
    assert lr_at(55, cfg, max_steps=100) == lr_at(55, cfg)
