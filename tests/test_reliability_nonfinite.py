"""Non-finite losses and gradients, and loss spikes, injected into the real training loop.

The fault: torch.nn.functional.cross_entropy (which the loop's loss calls) patched to return
NaN, or 50x the loss, for chosen optimizer steps of this process. train.on_nonfinite decides:
skip (the fused AdamW skips the update on the device; counted), rollback (reload the last
checkpoint and skip the data of the failed window) or fail. In every case no checkpoint ever holds
a non-finite weight or optimizer state, and the loop makes no more host syncs when it runs more
steps between logs.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from faults import copy_bucket, in_process, template, tiny_settings, train_in_process  # noqa: F401
from trainer.io.storage import open_storage
from trainer.state import protocol

ACCUM = 4  # tiny_settings: 8 sequences per step, micro-batches of 2


def inject(monkeypatch, bad_steps: set[int], factor: float = float("nan")) -> dict:
    """Scale the training loss by `factor` in the optimizer steps numbered `bad_steps` (1-based,
    counted from this process's first step; one-shot, like a hardware fault)."""
    real = F.cross_entropy
    calls = {"n": 0, "hit": 0}

    def cross_entropy(*args, **kwargs):
        loss = real(*args, **kwargs)
        if torch.is_grad_enabled():  # training, not evaluation
            calls["n"] += 1
            if (calls["n"] - 1) // ACCUM + 1 in bad_steps:
                calls["hit"] += 1
                return loss * factor
        return loss

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    return calls


def settings_for(template, tmp_path, **overrides) -> dict:
    return tiny_settings(template["corpus"], str(copy_bucket(template, tmp_path / "bucket")), str(tmp_path / "work"),
                         **{"train.max_steps": 16, "train.log_every_steps": 4, "train.checkpoint_every_steps": 4,
                            "checkpoint.keep_last": 10, "checkpoint.upload_async": False, **overrides})


def assert_no_checkpoint_holds_a_nan(settings: dict, tmp_path) -> list[int]:
    from safetensors.torch import load_file

    store = open_storage(settings["storage.bucket"])
    steps = protocol.complete_steps(store, "rel")
    for step in steps:
        d = protocol.fetch_verified(store, "rel", step, tmp_path / "check" / str(step))
        assert all(torch.isfinite(t).all() for t in load_file(str(d / "model.safetensors")).values())
        opt = torch.load(d / "optimizer.pt", weights_only=False)
        states = [s for key, o in opt.items() if key != "format" for s in o["state"].values()]  # by parameter name
        assert states and all(torch.isfinite(v).all() for s in states for v in s.values() if v.is_floating_point())
    return steps


def metrics(settings: dict) -> list[dict]:
    text = open_storage(settings["storage.bucket"]).read_text("runs/rel/metrics.jsonl")
    return [json.loads(line) for line in text.splitlines()]


def test_skip_counts_the_skipped_steps_and_keeps_weights_finite(template, tmp_path, in_process, monkeypatch):
    settings = settings_for(template, tmp_path, **{"train.on_nonfinite": "skip"})
    calls = inject(monkeypatch, {6, 7})
    result = train_in_process(settings, template)
    assert calls["hit"] == 2 * ACCUM and result["skipped_steps"] == 2 and result["step"] == 16
    rows = metrics(settings)
    assert [r["skipped_steps"] for r in rows] == [0, 2, 2, 2]
    assert all(r["loss"] == r["loss"] for r in rows)  # the skipped steps' NaN is not in the logged mean
    assert assert_no_checkpoint_holds_a_nan(settings, tmp_path) == [16, 12, 8, 4]


def test_rollback_reloads_the_last_checkpoint_and_skips_the_bad_window(template, tmp_path, in_process,
                                                                        monkeypatch, caplog):
    settings = settings_for(template, tmp_path, **{"train.on_nonfinite": "rollback"})
    inject(monkeypatch, {6})
    result = train_in_process(settings, template)
    out = caplog.text
    assert "rolled back from step 8 to step-00000004 after 1 step(s) with a non-finite loss" in out
    assert result["rollbacks"] == 1 and result["step"] == 16
    state = json.loads(open_storage(settings["storage.bucket"]).read_text(
        f"{protocol.checkpoints_prefix('rel')}/{protocol.step_name(16)}/trainer_state.json"))
    # 16 steps trained, and steps 5-8's batches (8 sequences each) skipped: they are not used again.
    assert state["data_position"] == (16 + 4) * 8 and state["rollbacks"] == 1
    assert [r["step"] for r in metrics(settings)] == [4, 8, 8, 12, 16]  # 8 again after the rollback
    assert assert_no_checkpoint_holds_a_nan(settings, tmp_path) == [16, 12, 8, 4]


def test_rollback_on_a_loss_spike(template, tmp_path, in_process, monkeypatch, caplog):
    settings = settings_for(template, tmp_path, **{"train.on_nonfinite": "rollback", "train.spike_factor": 3.0})
    inject(monkeypatch, {10}, factor=50.0)  # one step at 50x the loss: its window's mean is ~13x
    result = train_in_process(settings, template)
    assert "rolled back from step 12 to step-00000008 after a loss spike" in caplog.text
    assert result["spikes"] == 1 and result["rollbacks"] == 1 and result["step"] == 16
    assert assert_no_checkpoint_holds_a_nan(settings, tmp_path) == [16, 12, 8, 4]


def test_fail_stops_before_the_bad_window_reaches_a_checkpoint(template, tmp_path, in_process, monkeypatch):
    settings = settings_for(template, tmp_path, **{"train.on_nonfinite": "fail"})
    inject(monkeypatch, {6})
    with pytest.raises(FloatingPointError, match=r"1 step\(s\) with a non-finite loss or gradient before step 8 "
                                                 r"\(train.on_nonfinite=fail\)"):
        train_in_process(settings, template)
    assert assert_no_checkpoint_holds_a_nan(settings, tmp_path) == [4]


def test_rollback_without_a_checkpoint_to_go_back_to_fails_clearly(template, tmp_path, in_process, monkeypatch):
    settings = settings_for(template, tmp_path, **{"train.on_nonfinite": "rollback"})
    inject(monkeypatch, {2})
    with pytest.raises(FloatingPointError, match="no checkpoint to roll back to yet"):
        train_in_process(settings, template)
    assert assert_no_checkpoint_holds_a_nan(settings, tmp_path) == []


def test_host_syncs_depend_on_log_steps_not_on_steps(template, tmp_path, in_process, monkeypatch):
    """Tensor-to-Python conversions (a device sync on GPU) happen at log, eval and checkpoint steps
    only: 4x the steps between the same number of logs make the same number of them."""
    counts = []
    real = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__float__", "__int__")}

    def run(steps: int) -> int:
        n = {"syncs": 0}

        def counting(name):
            def f(self, *args, **kwargs):
                n["syncs"] += 1
                return real[name](self, *args, **kwargs)
            return f

        settings = settings_for(template, tmp_path / str(steps), **{
            "train.max_steps": steps, "train.log_every_steps": steps // 2, "train.checkpoint_every_steps": steps // 2,
            "train.warmup_steps": 1})
        with monkeypatch.context() as m:
            for name in real:
                m.setattr(torch.Tensor, name, counting(name))
            train_in_process(settings, template)
        return n["syncs"]

    counts = [run(4), run(16)]
    assert counts[0] == counts[1] > 0, counts
