"""The optimizer: AdamW with weight decay on matrices only (GPT-3, LLaMA), fused on every device.

The loop skips a step with a non-finite gradient on the device, without a host sync: it sets the
fused AdamW's `found_inf` (GradScaler's mechanism), and the kernel leaves weights and moments as
they were."""

from __future__ import annotations

import torch

from trainer.config import TrainConfig

ADAM_EPS = 1e-8  # Kingma & Ba 2015 default; LLaMA (Touvron et al. 2023) uses 1e-5 with bf16 Adam states


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not norms, not biases), as in GPT-3 and LLaMA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, hp: TrainConfig) -> torch.optim.Optimizer:
    """Fused AdamW over `model`'s trainable parameters with hp.lr, betas, weight decay."""
    return torch.optim.AdamW(param_groups(model, hp.weight_decay), lr=hp.lr, betas=(hp.beta1, hp.beta2),
                             eps=ADAM_EPS, fused=True)


def step_skipping_nonfinite(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """optimizer.step() that leaves weights and moments unchanged where found_inf (a 0-dim float
    tensor on the device, 1.0 = skip) is set; no host sync."""
    optimizer.found_inf, optimizer.grad_scale = found_inf, None
    optimizer.step()
