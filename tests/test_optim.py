"""The optimizers: both skip a non-finite step exactly, on the device, and round-trip their state."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.config import TrainConfig
from trainer.model.llama import build_model, llama_config
from trainer.training.optim import MuonAdamW, build_optimizer, is_hidden_matrix, step_skipping_nonfinite

HP = dataclasses.replace(TrainConfig(), lr=1e-2, weight_decay=0.8)


def tiny():
    torch.manual_seed(0)
    return build_model(llama_config("tiny", 128, 16), "sdpa")


def backward(model, scale: float = 1.0):
    ids = torch.randint(0, 128, (2, 17))
    (model(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss * scale).backward()


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_a_nonfinite_step_leaves_weights_and_state_exactly_as_they_were(name):
    model = tiny()
    opt = build_optimizer(model, dataclasses.replace(HP, optimizer=name))
    backward(model)
    step_skipping_nonfinite(opt, torch.zeros(()))  # one real step: moments and momentum exist
    opt.zero_grad()
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in _flat(opt.state_dict()).items()}
    backward(model, float("nan"))
    step_skipping_nonfinite(opt, torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    after = _flat(opt.state_dict())
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    opt.zero_grad()
    backward(model)
    step_skipping_nonfinite(opt, torch.zeros(()))  # and a finite step moves every weight again
    assert all(not torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def _flat(sd, prefix="") -> dict:
    out = {}
    if isinstance(sd, dict):
        for k, v in sd.items():
            out.update(_flat(v, f"{prefix}/{k}"))
    elif isinstance(sd, torch.Tensor):
        out[prefix] = sd
    return out


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny()
    opt = build_optimizer(model, dataclasses.replace(HP, optimizer="muon"))
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon) == (p.dim() == 2 and ".layers." in name) == is_hidden_matrix(name, p)
    scales = sorted(g["lr_scale"] for g in opt.param_groups)
    assert scales == [1.0, 1.0, 2.0]  # AdamW decay / no decay, Muon at 2 x train.lr
    assert [g["weight_decay"] for g in opt.adamw.param_groups] == [0.8, 0.0]


def test_muon_state_round_trips_through_a_checkpoint(tmp_path):
    model = tiny()
    hp = dataclasses.replace(HP, optimizer="muon")
    opt = build_optimizer(model, hp)
    backward(model)
    step_skipping_nonfinite(opt, torch.zeros(()))
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    other = build_optimizer(model, hp)
    other.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=False))
    a, b = _flat(opt.state_dict()), _flat(other.state_dict())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_muon_on_a_torch_without_it_is_a_config_error_before_anything_runs(tmp_path, monkeypatch):
    from trainer.config import ConfigError, load_config
    from trainer.job.stages import check_before_start

    monkeypatch.delattr(torch.optim, "Muon")
    cfg = load_config(None, {"train.optimizer": "muon", "storage.local_dir": str(tmp_path / "w")}, env={})
    with pytest.raises(ConfigError, match="train.optimizer=muon needs torch >= 2.9"):
        check_before_start(cfg)
    assert not (tmp_path / "w").exists()
