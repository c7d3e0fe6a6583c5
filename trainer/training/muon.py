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

Options beyond torch.optim.Muon (off by default; train.muon_ns, train.normuon,
train.cautious_weight_decay):
- Polar Express (Amsel et al. 2025, arXiv 2505.16932): five per-step quintic coefficients tuned to
  the polar factor's error, X / (1.02 ||X||_F) first (modded-nanogpt's train_gpt.py table).
- NorMuon (Li et al. 2025, arXiv 2510.05491): after orthogonalising, each row (each column of a wide
  matrix) is divided by the root of its running mean square (beta2 0.95), then the whole update is
  scaled back to the orthogonalised update's Frobenius norm.
- Cautious weight decay (Chen et al. 2025, arXiv 2510.12402): decay only the entries where the update
  and the weight have the same sign (where the step already moves the weight towards zero).
On one process, momentum buffers of one shape are kept as views of one stacked tensor, so a step
stacks only the gradients.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al. 2024; torch.optim._muon DEFAULT_A/B/C
NS_STEPS = 5  # torch.optim._muon DEFAULT_NS_STEPS
NS_EPS = 1e-7  # torch.optim._muon EPS
# Polar Express, 5 steps (Amsel et al. 2025, arXiv 2505.16932; the table of modded-nanogpt's
# train_gpt.py, github.com/KellerJordan/modded-nanogpt), with its 2% safety margin on the norm.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02
NORMUON_BETA2 = 0.95  # Li et al. 2025 (arXiv 2510.05491), as nanochat uses it


def newton_schulz(g: torch.Tensor, coefficients=NS_COEFFICIENTS, steps: int = NS_STEPS,
                  eps: float = NS_EPS, safety: float = 1.0) -> torch.Tensor:
    """(n, A, B) any float dtype -> (n, A, B) bf16: torch.optim._muon._zeropower_via_newtonschulz
    applied to each of the n matrices, as batched matmuls (baddbmm for its addmm). `coefficients`
    is one (a, b, c) for every step (torch's) or one per step (POLAR_EXPRESS_COEFFICIENTS, with
    safety 1.02: X is divided by safety x ||X||_F first)."""
    per_step = coefficients if isinstance(coefficients[0], (tuple, list)) else (coefficients,) * steps
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) * safety).clamp(min=eps)
    for a, b, c in per_step[:steps]:
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


def _orthogonalize_replicated(u: torch.Tensor, ns) -> torch.Tensor:
    """u (n, A, B), the same on every rank -> NS(u) (n, A, B) bf16: each rank computes n / world of
    them, one all_gather shares them."""
    world, rank = dist.get_world_size(), dist.get_rank()
    n = u.size(0)
    k = -(-n // world)
    mine = ns(_pad(u, k * world)[rank * k:(rank + 1) * k]).contiguous()
    out = torch.empty((k * world, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
    dist.all_gather_into_tensor(out, mine)
    return out[:n]


def _orthogonalize_row_sharded(u: torch.Tensor, group, ns) -> torch.Tensor:
    """u (n, R / world, C): this rank's rows of n matrices sharded evenly on dim 0 -> its rows of
    NS of each full matrix, (n, R / world, C) bf16. Matrix j is orthogonalised on rank j // k."""
    world = dist.get_world_size(group)
    n, rows, cols = u.shape
    k = -(-n // world)
    send = _pad(u.bfloat16(), k * world).contiguous()  # (world, k, rows, C) by owner; NS casts first anyway
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[s]: rank s's rows of my k matrices
    full = recv.view(world, k, rows, cols).transpose(0, 1).reshape(k, world * rows, cols)
    ortho = ns(full)  # (k, R, C)
    send = ortho.reshape(k, world, rows, cols).transpose(0, 1).contiguous()
    dist.all_to_all_single(recv, send, group=group)  # recv[o]: my rows of owner o's k matrices
    return recv.view(world * k, rows, cols)[:n]


def _orthogonalize_dtensor_each(u: torch.Tensor, like: list[DTensor], ns) -> torch.Tensor:
    """Any sharding: each matrix made whole on every rank (full_tensor), orthogonalised, and this
    rank's part taken back (distribute_tensor without communication)."""
    out = []
    for local, p in zip(u.unbind(0), like):
        whole = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()).full_tensor()
        ortho = ns(whole.unsqueeze(0))[0]
        out.append(distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None).to_local())
    return torch.stack(out)


def orthogonalize(u: torch.Tensor, params: list[torch.Tensor], ns=newton_schulz) -> torch.Tensor:
    """u (n, ...) the local updates of `params` (one shape) -> ns (Newton-Schulz: (n, A, B) -> (n, A, B)
    bf16) of each whole matrix, local part."""
    p = params[0]
    if isinstance(p, DTensor):
        mesh = p.device_mesh
        if mesh.size() == 1:
            return ns(u)
        if mesh.ndim == 1 and tuple(p.placements) == (Shard(0),) and p.shape[0] % mesh.size() == 0:
            return _orthogonalize_row_sharded(u, mesh.get_group(), ns)
        return _orthogonalize_dtensor_each(u, params, ns)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _orthogonalize_replicated(u, ns)
    return ns(u)


def nesterov_update(grads: list[torch.Tensor], momentum: torch.Tensor, skip: torch.Tensor | None, mu: float,
                    nesterov: bool) -> torch.Tensor:
    """torch.optim.Muon's momentum step on n stacked matrices: momentum (n, A, B) <- lerp(momentum,
    g, 1 - mu) in place; returns the update g.lerp(momentum, mu) (Nesterov) or the momentum. Where
    `skip` is set the gradient is replaced by the momentum (lerp(B, B, w) == B: it stays exact). One
    function so that torch.compile fuses the stack, the skip and both lerps into one pass."""
    grad = torch.stack(grads)
    if skip is not None:
        grad = torch.where(skip, momentum, grad)
    momentum.lerp_(grad, 1 - mu)
    return grad.lerp_(momentum, mu) if nesterov else momentum.clone()


def normuon_scale(ortho: torch.Tensor, second: torch.Tensor, beta2: float, skip: torch.Tensor | None
                  ) -> torch.Tensor:
    """NorMuon (Li et al. 2025, arXiv 2510.05491): ortho (n, A, B) -> ortho with each row (A >= B) or
    column (A < B) divided by the root of its running mean square `second` ((n, A, 1) or (n, 1, B)
    fp32, updated in place unless `skip`), rescaled to ortho's Frobenius norm."""
    o = ortho.float()
    dim = -1 if o.size(-2) >= o.size(-1) else -2
    mean_sq = o.square().mean(dim=dim, keepdim=True)
    new = second.lerp(mean_sq, 1 - beta2)
    second.copy_(new if skip is None else torch.where(skip, second, new))
    scaled = o * second.clamp(min=1e-10).rsqrt()
    norm = torch.linalg.vector_norm(o, dim=(-2, -1), keepdim=True)
    return scaled * (norm / torch.linalg.vector_norm(scaled, dim=(-2, -1), keepdim=True).clamp(min=1e-10))


class BatchedMuon(torch.optim.Optimizer):
    """torch.optim.Muon's arguments, defaults and state, stepped one shape at a time. Set
    `found_inf` (0-dim float tensor on the device, 1.0 = skip this step exactly) before step().
    Beyond torch's: `ns_safety` (Polar Express: 1.02 with POLAR_EXPRESS_COEFFICIENTS),
    `normuon_beta2` (NorMuon when set; state "normuon_second"), `cautious_weight_decay`, and
    `compile` (torch.compile the Newton-Schulz of each shape; CUDA only)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients=NS_COEFFICIENTS, eps: float = NS_EPS,
                 ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = None, ns_safety: float = 1.0,
                 normuon_beta2: float | None = None, cautious_weight_decay: bool = False, compile: bool = False):
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn, "ns_safety": ns_safety, "normuon_beta2": normuon_beta2,
                    "cautious_weight_decay": cautious_weight_decay}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only; got one of shape {tuple(p.shape)}")
        self.found_inf: torch.Tensor | None = None
        self._ns = torch.compile(newton_schulz, dynamic=False) if compile else newton_schulz
        self._nesterov = torch.compile(nesterov_update, dynamic=False) if compile else nesterov_update
        self._stacks: dict[tuple, torch.Tensor] = {}  # shape key -> (n, A, B) momentum the buffers view

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip = None if self.found_inf is None else self.found_inf > 0
        for i, group in enumerate(self.param_groups):
            buckets: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((tuple(p.shape), _local(p).shape, p.dtype, p.device), []).append(p)
            for key, params in buckets.items():
                self._step_shape(group, params, skip, (i, *key))
        return loss

    def _momentum(self, params: list[torch.Tensor], key: tuple) -> tuple[torch.Tensor, list | None]:
        """The stacked (n, A, B) momentum of `params` and, when it is a copy, the buffers to write it
        back to. Plain tensors on one shape keep their buffers as views of one stacked tensor
        (restacked once after load_state_dict replaced them); DTensor buffers are stacked each step."""
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        if isinstance(bufs[0], DTensor):
            local = [_local(b) for b in bufs]
            return torch.stack(local), local
        stacked = self._stacks.get(key)
        if stacked is None or len(stacked) != len(bufs) or any(
                b.data_ptr() != v.data_ptr() for b, v in zip(bufs, stacked.unbind(0))):
            stacked = torch.stack(bufs)
            self._stacks[key] = stacked
            for p, view in zip(params, stacked.unbind(0)):
                self.state[p]["momentum_buffer"] = view
        return stacked, None

    def _second_moment(self, params: list[torch.Tensor], ortho: torch.Tensor) -> torch.Tensor:
        """NorMuon's (n, A, 1) or (n, 1, B) fp32 running mean squares, stacked (written back by the caller)."""
        rows, cols = ortho.shape[-2:]
        shape = (rows, 1) if rows >= cols else (1, cols)
        for p in params:
            if "normuon_second" not in self.state[p]:
                self.state[p]["normuon_second"] = torch.zeros(shape, dtype=torch.float32, device=ortho.device)
        return torch.stack([self.state[p]["normuon_second"] for p in params])

    def _step_shape(self, group: dict, params: list[torch.Tensor], skip: torch.Tensor | None, key: tuple) -> None:
        """One step of the matrices `params` (one shape, local parts stacked to (n, A, B))."""
        momentum, write_back = self._momentum(params, key)
        update = self._nesterov([_local(p.grad) for p in params], momentum, skip, group["momentum"],
                                group["nesterov"])
        if write_back is not None:
            torch._foreach_copy_(write_back, list(momentum.unbind(0)))

        def ns(x):
            safety = group.get("ns_safety", 1.0)
            return self._ns(x, group["ns_coefficients"], group["ns_steps"], group["eps"], safety)

        ortho = orthogonalize(update, params, ns)
        if group.get("normuon_beta2") is not None:
            second = self._second_moment(params, ortho)
            ortho = normuon_scale(ortho, second, group["normuon_beta2"], skip)
            torch._foreach_copy_([self.state[p]["normuon_second"] for p in params], list(second.unbind(0)))
        lr = group["lr"]
        local = [_local(p) for p in params]
        decay = 1 - lr * group["weight_decay"]
        if group.get("cautious_weight_decay"):  # only where the step already moves the weight towards 0
            decay = 1 - lr * group["weight_decay"] * (ortho * torch.stack(local) > 0).to(local[0].dtype)
        if skip is not None:
            ortho = ortho * ~skip  # finite (from the momentum), so x 0 is exactly 0
            decay = torch.where(skip, 1.0, decay)
        if isinstance(decay, torch.Tensor) and decay.dim():
            torch._foreach_mul_(local, list(decay.unbind(0)))
        else:
            torch._foreach_mul_(local, decay)
        alpha = -adjusted_lr(lr, group["adjust_lr_fn"], params[0].shape)  # the whole matrix's shape
        # In the weights' dtype: _foreach_add_ of mixed dtypes (fp32 weights, a bf16 update) falls back to
        # one kernel per matrix (84 launches at 124m, profiled on an H200); the sum is the same, since
        # add_ promotes the bf16 update to fp32 either way.
        torch._foreach_add_(local, list(ortho.to(local[0].dtype).unbind(0)), alpha=alpha)
