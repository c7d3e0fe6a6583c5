"""Process-group setup for torchrun workers (or one process alone), and the small collectives the
loop and checkpoints need. DDP over NCCL on GPU, gloo on CPU; a second gloo group carries CPU-side
agreements (the stop flag, RNG states) so they never wait behind GPU work."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: object = None  # a gloo group for small CPU-side agreements (stop flag, RNG states)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order (pickled over the gloo group)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank's flag is (a MAX all-reduce over the gloo group)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.control)


def setup_distributed(device: str = "auto") -> Dist:
    """This process's rank and device from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK);
    initialises the process group when WORLD_SIZE > 1. device: train.device (auto, cuda, cpu)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    control = None
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        control = dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
    return Dist(rank, world, local_rank, dev, control)


def shutdown_distributed(barrier: bool = False) -> None:
    """Tear the process groups down before the interpreter exits. Left to interpreter shutdown,
    gloo's threads can be destroyed while joinable, and a rank dies with SIGABRT ("terminate called
    without an active exception") after its work is done, failing the whole torchrun. barrier (the
    ranks all finished): first wait for every rank, so that none tears its groups down while another
    still talks to it (seen once, 2026-12-04, on a 4-process gloo run right after its last checkpoint)."""
    if dist.is_available() and dist.is_initialized():
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def rng_state() -> dict:
    """This process's RNG streams (torch, numpy, python, CUDA), as saved in checkpoints."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# The process layout the launcher sees (before any process group exists) ---------------------------

def node_rank() -> int:
    """This node's rank in a multi-node job ($NODE_RANK, or torchrun's $GROUP_RANK; 0 alone)."""
    return int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)


def num_nodes() -> int:
    return int(os.environ.get("NNODES", "1") or 1)


def default_nproc(nproc: int, device: str) -> int:
    """Processes per node: train.nproc, else $NPROC, else every local GPU (1 on CPU)."""
    if nproc:
        return nproc
    if os.environ.get("NPROC"):
        return int(os.environ["NPROC"])
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1
