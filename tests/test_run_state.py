"""The resume contract (trainer/state/run.py), without torch: the newest state, how many steps a run
trains, the inputs check and the preemption marker. Fast: checkpoints here are folders of small files."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError
from trainer.io.storage import LocalStorage
from trainer.state import protocol
from trainer.state import run as run_state
from trainer.state.run import LoopState, run_steps

ROOT = Path(__file__).resolve().parent.parent


def publish_state(store, tmp_path, run_id: str, state: dict) -> None:
    """A complete checkpoint of `state["step"]` holding only trainer_state.json (and its manifest)."""
    d = tmp_path / "staged" / run_id / protocol.step_name(state["step"])
    d.mkdir(parents=True)
    (d / run_state.STATE_FILE).write_text(json.dumps(state))
    protocol.write_manifest(d, state["step"])
    protocol.publish(store, run_id, d, state["step"])


@pytest.fixture
def store(tmp_path):
    return LocalStorage(str(tmp_path / "bucket"))


def test_the_torch_free_commands_import_no_torch():
    code = ("import sys, trainer.job.status, trainer.state.run, trainer.state.protocol; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_steps_by_hand():
    fixed = LoopState(step=30, max_steps=123)
    assert run_steps(200, 0.0, None) == 200
    assert run_steps(200, 0.0, None, epoch_cap=79) == 79  # train.max_epochs caps it
    assert run_steps(50, 0.0, LoopState(step=30), epoch_cap=79) == 50
    assert run_steps(200, 5.0, None) is None  # a budget not fixed yet
    assert run_steps(200, 5.0, fixed) == 123  # the count the budget fixed, whatever train.max_steps says
    assert run_steps(200, 0.0, fixed) == 123  # a resume ends where the budget said
    assert run_steps(None, 0.0, None) is None
    assert run_state.finished(LoopState(step=200), 200) and not run_state.finished(LoopState(step=199), 200)
    assert not run_state.finished(None, 200) and not run_state.finished(LoopState(step=9), None)


def test_newest_state_is_the_newest_complete_checkpoints(store, tmp_path):
    assert run_state.newest_state(store, "r") is None
    publish_state(store, tmp_path, "r", {"step": 4, "tokens_seen": 40})
    publish_state(store, tmp_path, "r", {"step": 8, "tokens_seen": 80, "max_steps": 20})
    # A folder without a manifest counts for nothing.
    store.write_text(f"{protocol.checkpoints_prefix('r')}/{protocol.step_name(12)}/trainer_state.json", '{"step": 12}')
    state = run_state.newest_state(store, "r")
    assert (state.step, state.tokens_seen, state.max_steps) == (8, 80, 20)


def test_loop_state_loads_leniently_and_says_what_an_old_checkpoint_lacks(caplog):
    with caplog.at_level(logging.INFO, logger="trainer"):
        state = LoopState.from_dict({"step": 3, "tokens_seen": 9, "someday": 1})
    assert state == LoopState(step=3, tokens_seen=9)
    assert "trainer state of step 3 predates" in caplog.text and "inputs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        LoopState.from_dict({f: getattr(state, f) for f in state.__dataclass_fields__ if f != "window"})
    assert "predates" not in caplog.text  # a state without an open window is complete


def test_changed_inputs():
    saved = {"tokenizer": "t1", "data": "d1", "seq_len": 64}
    assert run_state.changed_inputs(saved, dict(saved)) == []
    assert run_state.changed_inputs(saved, {**saved, "data": "d2"}) == ["data"]
    assert run_state.changed_inputs(saved, {**saved, "data": "d2"}, resume_on_new_data=True) == []
    assert run_state.changed_inputs(saved, {**saved, "seq_len": 128}, resume_on_new_data=True) == ["seq_len"]
    assert run_state.changed_inputs({}, {"model": "m"}) == []  # a checkpoint older than the record passes


def test_check_resume_refuses_other_inputs_naming_them(store, tmp_path):
    run_state.check_resume(store, "r", {"data": "d2"})  # no checkpoint: nothing to resume
    publish_state(store, tmp_path, "r", {"step": 4, "inputs": {"data": "d1", "seq_len": 64}})
    run_state.check_resume(store, "r", {"data": "d1", "seq_len": 64})
    with pytest.raises(ConfigError, match=r"step-00000004 was trained on other inputs \(seq_len: 64 -> 128\)"):
        run_state.check_resume(store, "r", {"data": "d1", "seq_len": 128})
    with pytest.raises(ConfigError, match="run.resume_on_new_data=true"):
        run_state.check_resume(store, "r", {"data": "d2", "seq_len": 64})
    run_state.check_resume(store, "r", {"data": "d2", "seq_len": 64}, resume_on_new_data=True)


def test_the_preemption_marker_counts_only_with_its_checkpoint_published(store, tmp_path):
    local = tmp_path / "work"
    local.mkdir()
    assert run_state.preempted_step(local) is None
    run_state.mark_preempted(local, 8, 1.5)
    assert run_state.preempted_step(local) == 8
    assert run_state.published_as_newest(store, "r", 8) == (False, "none (LATEST absent)")
    publish_state(store, tmp_path, "r", {"step": 8})
    assert run_state.published_as_newest(store, "r", 8) == (True, "step-00000008 (LATEST step-00000008)")
    publish_state(store, tmp_path, "r", {"step": 12})
    assert run_state.published_as_newest(store, "r", 8)[0] is False
    run_state.clear_preempted(local)
    assert run_state.preempted_step(local) is None
