"""The optimizers: fused AdamW (weight decay on matrices only, as GPT-3 and LLaMA), or Muon on the
decoder's hidden matrices with fused AdamW on embeddings, head and norms (train.optimizer=muon).

The loop skips a step with a non-finite gradient on the device, without a host sync:
step_skipping_nonfinite() hands the fused AdamW `found_inf` (GradScaler's mechanism), and the
kernel leaves weights and moments as they were; the hidden matrices' Muon (muon.BatchedMuon:
torch.optim.Muon's maths, one batched Newton-Schulz per shape, split over ranks) reads the same
flag and leaves weights and momentum exactly as they were, copying nothing. MUON_IMPL = "torch"
runs torch.optim.Muon instead (kept for the side-by-side benchmark), which has no such input: then
a copy of the hidden matrices and their momentum from before the step is put back (torch.where).

Muon: Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"; the lr
matched to AdamW's update RMS as in Liu et al. 2025 (arXiv 2502.16982), torch.optim.Muon's
adjust_lr_fn="match_rms_adamw". Measured on the poetry reference run (one H200, 2026-11-30,
docs/reference-run/attempts/SWEEP-2026-11-30.md): 5.77 held-out bits/char after 60 s against
AdamW's 6.76 (same weight decay 0.8).
"""

from __future__ import annotations

import torch

from trainer.config import TrainConfig
from trainer.training.muon import (
    NORMUON_BETA2,
    NS_COEFFICIENTS,
    POLAR_EXPRESS_COEFFICIENTS,
    POLAR_EXPRESS_SAFETY,
    BatchedMuon,
)

ADAM_EPS = 1e-8  # Kingma & Ba 2015 default
MUON_MOMENTUM = 0.95  # Jordan et al. 2024; torch.optim.Muon's default, with Nesterov and 5 Newton-Schulz steps
MUON_IMPL = "batched"  # "batched": muon.BatchedMuon; "torch": torch.optim.Muon (scripts/bench_pretrain.py muon-torch)
MUON_LR_FACTOR = 2.0  # train.muon_lr = 0: this x train.lr (1.6e-3 for 8e-4 won on 124m; 1x was 0.11 bpc worse)


def param_groups(params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not norms, not biases), as in GPT-3 and LLaMA."""
    decay = [p for _, p in params if p.dim() >= 2]
    no_decay = [p for _, p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    """Muon's share: 2-D weights inside the decoder layers (attention and MLP projections), not the
    embeddings or the lm_head (Jordan et al. 2024 keep those on AdamW)."""
    return p.dim() == 2 and ".layers." in name


def build_optimizer(model: torch.nn.Module, hp: TrainConfig):
    """Fused AdamW over `model`'s trainable parameters (hp.optimizer=adamw), or MuonAdamW (muon).
    Every param group carries "lr_scale": the loop sets group lr = schedule lr x lr_scale.
    Raises ValueError when muon is asked for on a torch without torch.optim.Muon (< 2.9)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if hp.optimizer == "muon":
        return MuonAdamW(named, hp)
    groups = [{**g, "lr_scale": 1.0} for g in param_groups(named, hp.weight_decay)]
    return torch.optim.AdamW(groups, lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=ADAM_EPS, fused=True)


def muon_available() -> None:
    """Raise ValueError naming train.optimizer when this torch has no torch.optim.Muon (< 2.9)."""
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(f"train.optimizer=muon needs torch >= 2.9 (torch.optim.Muon); this is {torch.__version__}: "
                         f"use train.optimizer=adamw here")


def muon_options(hp: TrainConfig, hidden: list[torch.nn.Parameter]) -> dict:
    """BatchedMuon's options beyond torch.optim.Muon's from train.* (muon_ns, normuon,
    cautious_weight_decay), and compile: its Newton-Schulz compiled on CUDA when train.compile is not off.
    Raises ValueError naming train.normuon for matrices sharded over several ranks (FSDP): its row
    statistics would be per shard."""
    from torch.distributed.tensor import DTensor

    if hp.normuon and any(isinstance(p, DTensor) and p.device_mesh.size() > 1 for p in hidden):
        raise ValueError("train.normuon: not supported on FSDP-sharded matrices (train.strategy=fsdp); "
                         "use train.strategy=ddp or train.normuon=false")
    polar = hp.muon_ns == "polar-express"
    return {"ns_coefficients": POLAR_EXPRESS_COEFFICIENTS if polar else NS_COEFFICIENTS,
            "ns_safety": POLAR_EXPRESS_SAFETY if polar else 1.0,
            "normuon_beta2": NORMUON_BETA2 if hp.normuon else None,
            "cautious_weight_decay": hp.cautious_weight_decay,
            "compile": hp.compile != "off" and bool(hidden) and hidden[0].is_cuda}


class MuonAdamW:
    """Muon (BatchedMuon, or torch.optim.Muon when MUON_IMPL == "torch"; the same state dict) on the
    hidden matrices, fused AdamW on the rest, stepped as one optimizer: param_groups (both), step(),
    zero_grad(), state_dict() / load_state_dict()."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], hp: TrainConfig):
        muon_available()
        hidden = [p for n, p in named if is_hidden_matrix(n, p)]
        rest = [(n, p) for n, p in named if not is_hidden_matrix(n, p)]
        muon_lr = hp.muon_lr or MUON_LR_FACTOR * hp.lr
        kwargs = {"lr": muon_lr, "weight_decay": hp.weight_decay, "momentum": MUON_MOMENTUM, "nesterov": True,
                  "adjust_lr_fn": "match_rms_adamw"}
        if MUON_IMPL == "torch":
            self.muon = torch.optim.Muon([{"params": hidden, "lr_scale": muon_lr / hp.lr}], **kwargs)
        else:
            self.options = muon_options(hp, hidden)
            self.muon = BatchedMuon([{"params": hidden, "lr_scale": muon_lr / hp.lr}], **kwargs, **self.options)
        self.adamw = torch.optim.AdamW([{**g, "lr_scale": 1.0} for g in param_groups(rest, hp.weight_decay)],
                                       lr=hp.lr, betas=(hp.beta1, hp.beta2), eps=ADAM_EPS, fused=True)
        self.found_inf: torch.Tensor | None = None
        self.grad_scale = None

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups + self.muon.param_groups

    def step(self) -> None:
        self.adamw.found_inf, self.adamw.grad_scale = self.found_inf, None
        self.adamw.step()
        if isinstance(self.muon, BatchedMuon) or self.found_inf is None:
            self.muon.found_inf = self.found_inf  # read on the device: an exact skip, nothing copied
            self.muon.step()
            return
        params = [p for g in self.muon.param_groups for p in g["params"] if p.grad is not None]
        before = [(p, p.detach().clone(), self._buf(p)) for p in params]
        self.muon.step()
        skip = self.found_inf > 0
        with torch.no_grad():
            for p, weight, buf in before:
                p.copy_(torch.where(skip, weight, p))
                new = self.muon.state[p]["momentum_buffer"]
                new.copy_(torch.where(skip, buf if buf is not None else torch.zeros_like(new), new))

    def _buf(self, p) -> torch.Tensor | None:
        buf = self.muon.state.get(p, {}).get("momentum_buffer")
        return None if buf is None else buf.clone()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Moments and momentum from `state`; the Muon options stay this run's (train.muon_ns, ...),
        whatever the checkpoint's param groups say (torch's load_state_dict takes theirs)."""
        self.adamw.load_state_dict(state["adamw"])
        self.muon.load_state_dict(state["muon"])
        for group in self.muon.param_groups:
            group.update({k: v for k, v in getattr(self, "options", {}).items() if k != "compile"})


def step_skipping_nonfinite(optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step() that leaves weights and optimizer state unchanged where found_inf (a 0-dim
    float tensor on the device, 1.0 = skip) is set; no host sync."""
    optimizer.found_inf, optimizer.grad_scale = found_inf, None
    optimizer.step()
