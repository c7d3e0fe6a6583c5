"""BatchedMuon: torch.optim.Muon's maths one shape at a time, an exact on-device skip, and the same
steps on 1 process, 2 DDP processes and 2 FSDP processes (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.model.llama import build_model, llama_config
from trainer.training.muon import BatchedMuon, newton_schulz
from trainer.training.optim import is_hidden_matrix

KW = {"lr": 0.02, "weight_decay": 0.8, "momentum": 0.95, "nesterov": True, "adjust_lr_fn": "match_rms_adamw"}


def hidden(seed: int = 0) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    torch.manual_seed(seed)
    model = build_model(llama_config("tiny", 128, 16), "sdpa")
    return model, [p for n, p in model.named_parameters() if is_hidden_matrix(n, p)]


def backward(model, seed: int, scale: float = 1.0) -> None:
    torch.manual_seed(100 + seed)
    ids = torch.randint(0, 128, (4, 17))
    (model(input_ids=ids[:, :-1], labels=ids[:, 1:]).loss * scale).backward()


def test_newton_schulz_batched_equals_torch_per_matrix():
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.randn(3, 48, 24)
    ours = newton_schulz(g)
    for i in range(3):
        ref = _zeropower_via_newtonschulz(g[i], (3.4445, -4.7750, 2.0315), 5, 1e-7)
        torch.testing.assert_close(ours[i].float(), ref.float(), atol=2e-2, rtol=0)  # bf16 maths


def test_equals_torch_muon_over_several_steps_with_weight_decay():
    model_a, a = hidden()
    model_b, b = hidden()
    torch_muon, ours = torch.optim.Muon(a, **KW), BatchedMuon(b, **KW)
    for step in range(5):
        backward(model_a, step)
        backward(model_b, step)
        torch_muon.step()
        ours.found_inf = torch.zeros(())  # as the loop steps it
        ours.step()
        for m in (model_a, model_b):
            m.zero_grad(set_to_none=True)
    assert len({tuple(p.shape) for p in a}) < len(a)  # several matrices share a shape: batched
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)  # fp32 noise
        torch.testing.assert_close(torch_muon.state[p]["momentum_buffer"], ours.state[q]["momentum_buffer"],
                                   atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(p, q) for p, q in zip(hidden()[1], b))  # and it moved


def test_a_nonfinite_step_leaves_weights_and_momentum_exactly_as_they_were():
    model, params = hidden()
    opt = BatchedMuon(params, **KW)
    backward(model, 0)
    opt.found_inf = torch.zeros(())
    opt.step()
    model.zero_grad(set_to_none=True)
    weights = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    backward(model, 1, float("nan"))
    params[0].grad[0, 0] = float("inf")
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(w, p) for w, p in zip(weights, params))
    assert all(torch.equal(b, opt.state[p]["momentum_buffer"]) for b, p in zip(bufs, params))


def test_state_dict_round_trips_and_loads_torch_muon_checkpoints(tmp_path):
    model, params = hidden()
    torch_muon = torch.optim.Muon(params, **KW)  # what checkpoints before BatchedMuon hold
    backward(model, 0)
    torch_muon.step()
    torch.save(torch_muon.state_dict(), tmp_path / "old.pt")
    ours = BatchedMuon(params, **KW)
    ours.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=False))
    for p in params:
        assert torch.equal(ours.state[p]["momentum_buffer"], torch_muon.state[p]["momentum_buffer"])
    ours.found_inf = torch.zeros(())
    ours.step()
    torch.save(ours.state_dict(), tmp_path / "new.pt")
    again = BatchedMuon(params, **KW)
    again.load_state_dict(torch.load(tmp_path / "new.pt", weights_only=False))
    assert again.state_dict()["param_groups"] == ours.state_dict()["param_groups"]
    for p in params:
        assert torch.equal(again.state[p]["momentum_buffer"], ours.state[p]["momentum_buffer"])


WORKER = r'''
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, os.environ["TEST_DIR"])
from test_muon import KW, backward, hidden
from trainer.training.muon import BatchedMuon

mode, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model, _ = hidden()
if mode == "fsdp":
    from trainer.parallel.fsdp import shard, shard_root
    shard(model, bf16=False)
    shard_root(model, bf16=False)
params = [p for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n]
opt = BatchedMuon(params, **KW)
for step in range(4):
    backward(model, step)  # the same batch on every rank: the average gradient is the 1-process one
    if mode == "ddp":
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world
    opt.found_inf = torch.tensor(float(step == 2))  # step 2 skipped
    opt.step()
    model.zero_grad(set_to_none=True)
full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
torch.save({"weights": [full(p).detach() for p in params],
            "momentum": [full(opt.state[p]["momentum_buffer"]) for p in params]}, f"{out}/{mode}{rank}.pt")
dist.barrier()  # no rank tears gloo down while the other still talks to it (SIGABRT at exit on 2 cores)
dist.destroy_process_group()
'''


def _two_processes(mode: str, tmp_path: Path) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(here.parent), "TEST_DIR": str(here), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), mode, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(tmp_path / f"{mode}{r}.pt") for r in (0, 1)]


def _one_process() -> dict:
    model, params = hidden()
    opt = BatchedMuon(params, **KW)
    for step in range(4):
        backward(model, step)
        opt.found_inf = torch.tensor(float(step == 2))
        opt.step()
        model.zero_grad(set_to_none=True)
    return {"weights": [p.detach() for p in params], "momentum": [opt.state[p]["momentum_buffer"] for p in params]}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return _two_processes("ddp", tmp_path_factory.mktemp("ddp"))


def test_two_ddp_processes_split_the_work_and_equal_one_process(ddp):
    r0, r1 = ddp
    for key in ("weights", "momentum"):
        assert all(torch.equal(a, b) for a, b in zip(r0[key], r1[key]))  # every rank the same bits
    one = _one_process()
    for key in ("weights", "momentum"):
        for a, b in zip(r0[key], one[key]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_two_fsdp_processes_equal_two_ddp_processes(ddp, tmp_path):
    f0, f1 = _two_processes("fsdp", tmp_path)
    for key in ("weights", "momentum"):
        for a, b, c in zip(f0[key], f1[key], ddp[0][key]):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-5)


# Options beyond torch.optim.Muon: Polar Express, NorMuon, cautious weight decay ------------------

def test_polar_express_is_the_per_step_polynomial_and_orthogonalises():
    from trainer.training.muon import POLAR_EXPRESS_COEFFICIENTS, POLAR_EXPRESS_SAFETY

    torch.manual_seed(0)
    g = torch.randn(3, 24, 48)
    ours = newton_schulz(g, POLAR_EXPRESS_COEFFICIENTS, 5, 1e-7, POLAR_EXPRESS_SAFETY)
    for i in range(3):  # the polynomial written out, one matrix at a time, in float64
        x = g[i].double()
        x = x / (x.norm() * POLAR_EXPRESS_SAFETY)
        for a, b, c in POLAR_EXPRESS_COEFFICIENTS:
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        assert (ours[i].double() - x).norm() / x.norm() < 0.06  # bf16 (measured 0.03; steps reversed: 100)
    singular = torch.linalg.svdvals(ours.float())
    quintic = torch.linalg.svdvals(newton_schulz(g).float())
    assert (singular - 1).abs().max() < 0.3  # orthogonal up to Polar Express's bf16 error
    assert (singular - 1).abs().mean() < (quintic - 1).abs().mean()  # closer to the polar factor than torch's


def test_normuon_gives_every_row_the_same_rms_and_keeps_the_norm():
    from trainer.training.muon import normuon_scale

    torch.manual_seed(0)
    ortho = torch.randn(2, 16, 8) * torch.linspace(0.1, 3, 16)[None, :, None]  # rows of unequal RMS
    second = torch.zeros(2, 16, 1)
    out = normuon_scale(ortho, second, 0.95, None)
    rms = out.square().mean(-1)
    torch.testing.assert_close(rms, rms[:, :1].expand_as(rms), rtol=1e-4, atol=0)
    torch.testing.assert_close(out.norm(dim=(-2, -1)), ortho.norm(dim=(-2, -1)), rtol=1e-5, atol=0)
    torch.testing.assert_close(second, 0.05 * ortho.square().mean(-1, keepdim=True))
    wide = normuon_scale(torch.randn(1, 4, 12), torch.zeros(1, 1, 12), 0.95, None)  # wide: per column
    cols = wide.square().mean(-2)
    torch.testing.assert_close(cols, cols[:, :1].expand_as(cols), rtol=1e-4, atol=0)


def test_cautious_weight_decay_decays_only_where_the_update_agrees_in_sign():
    model_a, a = hidden()
    model_b, b = hidden()
    kw = {**KW, "lr": 0.05}
    plain, cautious = BatchedMuon(a, **kw), BatchedMuon(b, **kw, cautious_weight_decay=True)
    before = [p.detach().clone() for p in a]
    for m, opt in ((model_a, plain), (model_b, cautious)):
        backward(m, 0)
        opt.step()
    decay = kw["lr"] * kw["weight_decay"]
    for w, p, q in zip(before, a, b):
        diff = q - p  # cautious minus plain: + lr wd w where the entry was spared, else 0
        spared = ~torch.isclose(diff, torch.zeros_like(diff), atol=1e-7)
        assert spared.any() and (~spared).any()
        torch.testing.assert_close(diff[spared], decay * w[spared], rtol=1e-3, atol=1e-7)
        step = w * (1 - decay) - p  # plain's orthogonalised step: cautious spares entries where it opposes w
        assert (step[spared] * w[spared] <= 1e-7).all()


def test_a_skipped_step_is_exact_with_every_option_on():
    model, params = hidden()
    opt = BatchedMuon(params, **KW, ns_coefficients=newton_schulz.__defaults__[0], normuon_beta2=0.95,
                      cautious_weight_decay=True)
    backward(model, 0)
    opt.found_inf = torch.zeros(())
    opt.step()
    model.zero_grad(set_to_none=True)
    state = [(p.detach().clone(), opt.state[p]["momentum_buffer"].clone(), opt.state[p]["normuon_second"].clone())
             for p in params]
    backward(model, 1, float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    for (w, buf, second), p in zip(state, params):
        assert torch.equal(w, p)
        assert torch.equal(buf, opt.state[p]["momentum_buffer"])
        assert torch.equal(second, opt.state[p]["normuon_second"])


def test_momentum_buffers_stay_views_of_one_stack_and_survive_a_reload(tmp_path):
    model, params = hidden()
    opt = BatchedMuon(params, **KW)
    for step in range(2):
        backward(model, step)
        opt.step()
        model.zero_grad(set_to_none=True)
    by_shape = {}
    for p in params:
        by_shape.setdefault(tuple(p.shape), []).append(opt.state[p]["momentum_buffer"])
    for bufs in by_shape.values():  # one storage per shape: the step stacks no momentum
        assert len({b.untyped_storage().data_ptr() for b in bufs}) == 1
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    model_b, params_b = hidden()
    with torch.no_grad():
        for p, q in zip(params, params_b):
            q.copy_(p)
    again = BatchedMuon(params_b, **KW)
    again.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=False))
    for m, o in ((model, opt), (model_b, again)):
        backward(m, 5)
        o.step()
    for p, q in zip(params, params_b):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], again.state[q]["momentum_buffer"], atol=0, rtol=0)


def test_muon_options_follow_the_config_and_survive_loading_a_checkpoint():
    from trainer.config import TrainConfig
    from trainer.training.muon import POLAR_EXPRESS_COEFFICIENTS
    from trainer.training.optim import build_optimizer

    model, _ = hidden()
    hp = TrainConfig(optimizer="muon", muon_ns="polar-express", normuon=True, cautious_weight_decay=True,
                     compile="off")
    opt = build_optimizer(model, hp)
    group = opt.muon.param_groups[0]
    assert group["ns_coefficients"] == POLAR_EXPRESS_COEFFICIENTS and group["normuon_beta2"] == 0.95
    plain = build_optimizer(model, TrainConfig(optimizer="muon", compile="off"))
    opt.load_state_dict(plain.state_dict())  # a checkpoint saved without the options
    group = opt.muon.param_groups[0]
    assert group["ns_coefficients"] == POLAR_EXPRESS_COEFFICIENTS and group["cautious_weight_decay"]
