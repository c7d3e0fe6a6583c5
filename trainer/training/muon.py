"""Muon with the matrices of one shape orthogonalised together: one batched Newton-Schulz per shape
(the 124m's 84 hidden matrices are 4 shapes), not one loop per matrix as torch.optim.Muon does.

The maths is torch.optim.Muon's (torch/optim/_muon.py, torch 2.9-2.13), step for step:
momentum buffer B <- lerp(B, g, 1 - mu); Nesterov update g.lerp(B, mu); the quintic Newton-Schulz
iteration in bf16 with (a, b, c) = (3.4445, -4.7750, 2.0315), 5 steps, X / max(||X||_F, 1e-7) first,
the wide orientation (transpose when rows > cols); decoupled weight decay p <- p (1 - lr wd); then
p <- p - adjusted_lr O with adjust_lr_fn "match_rms_adamw" = 0.2 sqrt(max(A, B)) (Liu et al. 2025,
arXiv 2502.16982) or "original" = sqrt(max(1, A / B)) (Jordan et al. 2024). The state is torch's
too (state[p]["momentum_buffer"]), so checkpoints of either load into the other.

Distributed, detected from the parameters:
- DTensor parameters sharded on dim 0 over a 1-D mesh (FSDP2): for each shape, the matrices are
  dealt to owner ranks; one all_to_all brings each owner the row shards of its matrices, the owner
  orthogonalises them, a second all_to_all returns each rank its rows (the owner scheme of Dion,
  github.com/microsoft/dion dion/muon.py, and Essential AI's all-to-all Muon). Other placements or
  uneven shards: full_tensor() per matrix on every rank (correct, redundant).
- Plain parameters in a process group of several ranks (DDP, identical gradients on every rank):
  each rank orthogonalises its share of each shape, then one all_gather gives every rank every
  update (modded-nanogpt's distributed Muon, github.com/KellerJordan/modded-nanogpt), so all ranks
  apply the same bits.

Non-finite steps: `found_inf` (0-dim float on the device, 1.0 = skip; GradScaler's convention) is
read on the device. Where it is set, the gradient is replaced by the momentum buffer (lerp(B, B, w)
== B exactly), the decay factor becomes 1.0 and the orthogonalised update is multiplied by 0: the
weights and the momentum stay bit for bit as they were, with no copy kept and no host sync.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al. 2024; torch.optim._muon DEFAULT_A/B/C
NS_STEPS = 5  # torch.optim._muon DEFAULT_NS_STEPS
NS_EPS = 1e-7  # torch.optim._muon EPS


def newton_schulz(g: torch.Tensor, coefficients=NS_COEFFICIENTS, steps: int = NS_STEPS,
                  eps: float = NS_EPS) -> torch.Tensor:
    """(n, A, B) any float dtype -> (n, A, B) bf16: torch.optim._muon._zeropower_via_newtonschulz
    applied to each of the n matrices, as batched matmuls (baddbmm for its addmm)."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, gram_update, x, beta=a)
    return x.mT if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape) -> float:
    """torch.optim._muon._adjust_lr: the lr of a matrix of `shape` (A, B)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """x (m, ...) with zero matrices appended to n >= m (NS maps a zero matrix to zero)."""
    return x if x.size(0) == n else torch.cat([x, x.new_zeros((n - x.size(0), *x.shape[1:]))])


def _orthogonalize_replicated(u: torch.Tensor) -> torch.Tensor:
    """u (n, A, B), the same on every rank -> NS(u) (n, A, B) bf16: each rank computes n / world of
    them, one all_gather shares them."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n = u.size(0)
    k = -(-n // world)
    mine = newton_schulz(_pad(u, k * world)[rank * k:(rank + 1) * k]).contiguous()
    out = torch.empty((k * world, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
    dist.all_gather_into_tensor(out, mine)
    return out[:n]


def _orthogonalize_row_sharded(u: torch.Tensor, group) -> torch.Tensor:
    """u (n, R / world, C): this rank's rows of n matrices sharded evenly on dim 0 -> its rows of
    NS of each full matrix, (n, R / world, C) bf16. Matrix j is orthogonalised on rank j // k."""
    world = dist.get_world_size(group)
    n, rows, cols = u.shape
    k = -(-n // world)
    send = _pad(u.bfloat16(), k * world).contiguous()  # (world, k, rows, C) by owner; NS casts first anyway
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[s]: rank s's rows of my k matrices
    full = recv.view(world, k, rows, cols).transpose(0, 1).reshape(k, world * rows, cols)
    ortho = newton_schulz(full)  # (k, R, C)
    send = ortho.reshape(k, world, rows, cols).transpose(0, 1).contiguous()
    dist.all_to_all_single(recv, send, group=group)  # recv[o]: my rows of owner o's k matrices
    return recv.view(world * k, rows, cols)[:n]


def _orthogonalize_dtensor_each(u: torch.Tensor, like: list[DTensor]) -> torch.Tensor:
    """Any sharding: each matrix made whole on every rank (full_tensor), orthogonalised, and this
    rank's part taken back (distribute_tensor without communication)."""
    out = []
    for local, p in zip(u.unbind(0), like):
        whole = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
        ortho = newton_schulz(whole.unsqueeze(0))[0]
        out.append(distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None).to_local())
    return torch.stack(out)


def orthogonalize(u: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """u (n, ...) the local updates of `params` (one shape) -> NS of each whole matrix, local part."""
    p = params[0]
    if isinstance(p, DTensor):
        mesh = p.device_mesh
        if mesh.size() == 1:
            return newton_schulz(u)
        if mesh.ndim == 1 and tuple(p.placements) == (Shard(0),) and p.shape[0] % mesh.size() == 0:
            return _orthogonalize_row_sharded(u, mesh.get_group())
        return _orthogonalize_dtensor_each(u, params)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _orthogonalize_replicated(u)
    return newton_schulz(u)


class BatchedMuon(torch.optim.Optimizer):
    """torch.optim.Muon's arguments, defaults and state, stepped one shape at a time. Set
    `found_inf` (0-dim float tensor on the device, 1.0 = skip this step exactly) before step()."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients=NS_COEFFICIENTS, eps: float = NS_EPS,
                 ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = None):
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only; got one of shape {tuple(p.shape)}")
        self.found_inf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip = None if self.found_inf is None else self.found_inf > 0
        for group in self.param_groups:
            buckets: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((tuple(p.shape), _local(p).shape, p.dtype, p.device), []).append(p)
            for params in buckets.values():
                self._step_shape(group, params, skip)
        return loss

    def _step_shape(self, group: dict, params: list[torch.Tensor], skip: torch.Tensor | None) -> None:
        """One step of the matrices `params` (one shape, local parts stacked to (n, A, B))."""
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        bufs = [_local(self.state[p]["momentum_buffer"]) for p in params]
        momentum = torch.stack(bufs)
        grad = torch.stack([_local(p.grad) for p in params])
        if skip is not None:
            grad = torch.where(skip, momentum, grad)  # lerp(B, B, w) == B: the momentum stays exact
        momentum.lerp_(grad, 1 - group["momentum"])
        torch._foreach_copy_(bufs, list(momentum.unbind(0)))
        update = grad.lerp_(momentum, group["momentum"]) if group["nesterov"] else momentum
        ortho = orthogonalize(update, params)
        lr, decay = group["lr"], 1 - group["lr"] * group["weight_decay"]
        if skip is not None:
            ortho = ortho * ~skip  # finite (from the momentum), so x 0 is exactly 0
            decay = torch.where(skip, 1.0, decay)
        local = [_local(p) for p in params]
        torch._foreach_mul_(local, decay)
        alpha = -adjusted_lr(lr, group["adjust_lr_fn"], params[0].shape)  # the whole matrix's shape
        torch._foreach_add_(local, list(ortho.unbind(0)), alpha=alpha)
