"""optimizer.pt holds the optimizer state keyed by parameter name (issue 21: no map of parameter
positions), and a checkpoint saved before that (keyed by index) loads through a logged migration."""

from __future__ import annotations

import logging

import pytest
import torch

from trainer.config import TrainConfig
from trainer.model.llama import build_model, llama_config
from trainer.parallel import fsdp as sharding
from trainer.parallel.distributed import Dist
from trainer.state import checkpoint
from trainer.training.optim import build_optimizer

OPTIMIZERS = ["adamw", "muon"] if hasattr(torch.optim, "Muon") else ["adamw"]


def trained(optimizer: str, seed: int = 0):
    """A tiny model and its optimizer after two steps (every state tensor filled)."""
    torch.manual_seed(seed)
    model = build_model(llama_config("tiny", 100, 16))
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-3, weight_decay=0.1))
    for _ in range(2):
        ids = torch.randint(0, 100, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def torch_states(opt) -> list[dict]:
    """Each torch optimizer's own state_dict (index-keyed), to compare two optimizers by."""
    return [o.state_dict() for o in sharding._optimizers(opt).values()]


def assert_same_state(a, b) -> None:
    for sa, sb in zip(torch_states(a), torch_states(b), strict=True):
        assert sa["state"].keys() == sb["state"].keys() and sa["state"]
        for i in sa["state"]:
            for k, v in sa["state"][i].items():
                assert torch.equal(v, sb["state"][i][k]), (i, k)
        assert [g["params"] for g in sa["param_groups"]] == [g["params"] for g in sb["param_groups"]]
        assert [g["lr"] for g in sa["param_groups"]] == [g["lr"] for g in sb["param_groups"]]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_optimizer_state_is_saved_by_parameter_name_and_loads_back(optimizer):
    model, opt = trained(optimizer)
    saved = sharding.named_optimizer_state(model, opt)
    names = {n for n, _ in model.named_parameters()}
    assert saved["format"] == sharding.OPTIMIZER_FORMAT
    keyed = [k for key, sd in saved.items() if key != "format" for k in sd["state"]]
    assert keyed and set(keyed) <= names and len(keyed) == len(set(keyed))  # names, each parameter once

    fresh, fresh_opt = trained(optimizer, seed=1)  # other weights, other state
    assert not sharding.load_named_optimizer_state(fresh, fresh_opt, saved)  # nothing to migrate
    assert_same_state(opt, fresh_opt)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_an_index_keyed_optimizer_file_is_migrated_to_the_same_state(optimizer):
    model, opt = trained(optimizer)
    legacy = opt.state_dict()  # what optimizer.pt held before 2026-12-03
    fresh, fresh_opt = trained(optimizer, seed=1)
    assert sharding.load_named_optimizer_state(fresh, fresh_opt, legacy)  # migrated
    assert_same_state(opt, fresh_opt)


def test_a_legacy_file_for_another_model_is_refused_naming_the_counts():
    model, opt = trained("adamw")
    legacy = opt.state_dict()
    legacy["param_groups"][0]["params"] = legacy["param_groups"][0]["params"][:-1]
    fresh, fresh_opt = trained("adamw", seed=1)
    with pytest.raises(ValueError, match=r"optimizer.pt \(optimizer\): \d+ parameters saved, \d+ in this model"):
        sharding.load_named_optimizer_state(fresh, fresh_opt, legacy)


def test_a_checkpoint_folder_with_a_legacy_optimizer_file_loads_and_says_so(tmp_path, caplog):
    from safetensors.torch import save_model

    model, opt = trained("adamw")
    save_model(model, str(tmp_path / "model.safetensors"))
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    fresh, fresh_opt = trained("adamw", seed=1)
    d = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    with caplog.at_level(logging.INFO):
        checkpoint._load_hf_side(tmp_path, fresh, fresh_opt, d)
    assert "keyed by parameter index" in caplog.text and "migrated to parameter names" in caplog.text
    assert_same_state(opt, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
