"""The commands as people start them: one training process is `python -m trainer.training.worker`
(torchrun's command line), not an `entrypoint.py` command."""

import pytest

import entrypoint
from faults import job_main, worker_args
from trainer.config import to_yaml
from trainer.io.artifacts import Artifacts


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
    monkeypatch.setattr(worker, "pretrain_worker", lambda cfg, arts: seen.update(cfg=cfg, arts=arts))
    config = tmp_path / "c.yaml"
    config.write_text(to_yaml(load_config(None, {"run.id": "w1", "train.max_steps": 30}, env={})), encoding="utf-8")
    args = worker_args(config, {"tokenizer_key": "tok/k", "data_key": "data/k"}, tmp_path)
    assert args[:3] == ["-m", "trainer.training.worker", "--stage=pretrain"]
    job_main(args)
    assert (seen["cfg"].run.id, seen["cfg"].train.max_steps) == ("w1", 30)
    assert seen["arts"] == Artifacts("tok/k", "data/k")
