"""FSDP2 (train.strategy=fsdp): the model sharded over the ranks, and its training state saved and
loaded through torch.distributed.checkpoint (DCP).

Sharding (as torchtitan applies it): `fully_shard` on every decoder layer, then on the whole model,
so a layer's weights are all-gathered just before its forward/backward and freed after; gradients
are reduce-scattered (averaged over ranks, as DDP averages them: the loop's loss scaling is the same).
With bf16, MixedPrecisionPolicy computes in bf16 and keeps fp32 master weights, optimizer state and
gradient reductions (Zhao et al. 2023, "PyTorch FSDP", sec. 4.4).

Checkpoints of a sharded model hold, instead of model.safetensors + optimizer.pt, DCP files: every
rank writes `__<rank>_0.distcp` with its shards (model and optimizer, keyed by parameter name), rank
0 also the entries every rank holds and `.metadata`. DCP reshards on load, so a checkpoint resumes
on any number of ranks, sharded or not; a sharded model also loads a Hugging Face checkpoint
(model.safetensors + optimizer.pt, whose optimizer state is keyed by parameter name too:
named_optimizer_state).
`consolidate` turns DCP weights back into a Hugging Face folder (export, chat, eval).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from trainer.model.llama import FSDP_AUTO_PARAMS

DCP_METADATA = ".metadata"  # written by torch.distributed.checkpoint's FileSystemWriter
# Free each block's gathered weights after its forward and gather them again for its backward
# (ZeRO-3; False keeps them until the backward: ZeRO-2's memory, one all-gather fewer).
RESHARD_AFTER_FORWARD = True
REDUCE_DTYPE = torch.float32  # gradient reduce-scatter dtype under bf16 (fp32: sums over many ranks stay exact)


def resolve_strategy(requested: str, n_params: int, world: int) -> str:
    """"fsdp" or "ddp" for train.strategy (auto, ddp, fsdp) and a model of n_params parameters. auto
    never shards one process (nothing to shard over: its checkpoints are Hugging Face folders, which
    a sharded run resumes from, and the other way round); an explicit fsdp does (the same code path
    on one GPU as on many, e.g. to measure FSDP's per-GPU speed)."""
    if requested == "auto":
        return "fsdp" if n_params >= FSDP_AUTO_PARAMS and world > 1 else "ddp"
    return requested


def ensure_process_group(device: torch.device) -> None:
    """A process group of one (FSDP needs a device mesh) when torchrun started none: one process
    alone, or the in-process path of `run`. An in-memory store, so no port is opened."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1, device_id=device if device.type == "cuda" else None)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face decoder (LlamaForCausalLM: model.model.layers)."""
    return list(model.model.layers)


def _mp_policy(bf16: bool):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=REDUCE_DTYPE) if bf16 else \
        MixedPrecisionPolicy()


def shard(model, bf16: bool) -> None:
    """fully_shard every decoder layer, and the embedding + final norm + head as one unit, in place
    (parameters become DTensors sharded on dim 0 over all ranks); the model itself holds no
    parameter of its own then, and shard_root makes the module training calls the root. bf16:
    compute in bf16, reduce gradients and keep weights in fp32."""
    from torch.distributed.fsdp import fully_shard

    model.config.architectures = [type(model).__name__]  # checkpoints' config.json: the class before wrapping
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=_mp_policy(bf16), reshard_after_forward=RESHARD_AFTER_FORWARD)
    # One unit: all-gathered at the embedding's forward, kept until the head's; tied embeddings stay whole.
    fully_shard([model.get_input_embeddings(), model.model.norm, model.get_output_embeddings()],
                mp_policy=_mp_policy(bf16))


def shard_root(module, bf16: bool) -> None:
    """fully_shard the module the loop calls (the loss module around the model) as FSDP's root: its
    first forward sets up every unit under it. After that the units also run outside it (the bare
    model's generate for samples), each all-gathering its own parameters."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(module, mp_policy=_mp_policy(bf16))


def materialize(model, build_full, device: torch.device) -> None:
    """Give a model sharded while its parameters were on the meta device storage on `device` and its
    starting weights, in place. Rank 0 calls build_full() (-> the same model with real weights, on
    the CPU) and broadcasts it: every rank receives only its shards of the weights, plus every buffer
    (RoPE's inv_freq, which no state dict holds). So no GPU ever holds the whole model, and only
    rank 0's host memory does (7b: 27 GB in fp32). Collective: every rank calls it.
    Raises KeyError when build_full's model lacks a buffer the sharded model has."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)  # tied weights stay tied (one Parameter, moved in place)
    full = build_full() if dist.get_rank() == 0 else None
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    buffers = dict(full.named_buffers()) if full is not None else {}
    for name, buf in model.named_buffers():
        if full is not None:
            buf.copy_(buffers[name])
        dist.broadcast(buf, src=0)


def is_dcp_file(name: str) -> bool:
    return name == DCP_METADATA or name.endswith(".distcp")


def is_sharded(model) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to max_norm (math.inf: measure only); return the norm before
    clipping as a 0-dim fp32 tensor on the device (non-finite when a gradient is). Sharded
    gradients: the norm is reduced over the ranks first (torchtitan's clip_grad_norm_)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


# Training state through torch.distributed.checkpoint ---------------------------------------------

def _optimizers(optimizer) -> dict[str, torch.optim.Optimizer]:
    """The torch optimizers inside `optimizer` (MuonAdamW holds two), by their state-dict key."""
    if isinstance(optimizer, torch.optim.Optimizer):
        return {"optimizer": optimizer}
    return {"adamw": optimizer.adamw, "muon": optimizer.muon}


def _state_dicts(model, optimizer) -> dict:
    """Model and optimizer state keyed by parameter name (DTensors when sharded), as DCP saves them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {"model": get_model_state_dict(model)}
    for key, opt in _optimizers(optimizer).items():
        out[key] = get_optimizer_state_dict(model, opt)
    return out


def save_dcp(folder: Path, model, optimizer) -> None:
    """Every rank writes its shards of model and optimizer into folder (which must exist on every
    node); rank 0 also writes .metadata. Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    # Entries every rank holds (optimizer step counts, param groups: small) go into rank 0's file
    # rather than being spread over all files by size, so a resumed rank reads its own shards' files
    # and rank 0's, and a node fetches only those (trainer/state/shard_reader.py).
    dcp.save(_state_dicts(model, optimizer), storage_writer=dcp.FileSystemWriter(str(folder), thread_count=1),
             planner=DefaultSavePlanner(dedup_save_to_lowest_rank=True))


def load_dcp(folder: Path, model, optimizer, reader=None) -> None:
    """Load a DCP checkpoint into model and optimizer, resharding to this run's ranks (or into an
    unsharded model). reader: a DCP StorageReader of folder (default: torch's FileSystemReader,
    every file already there). Collective when a process group exists."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _state_dicts(model, optimizer)
    dcp.load(state, checkpoint_id=str(folder), storage_reader=reader,
             no_dist=not torch.distributed.is_initialized())
    set_model_state_dict(model, state["model"])
    for key, opt in _optimizers(optimizer).items():
        set_optimizer_state_dict(model, opt, state[key])


OPTIMIZER_FORMAT = "by-name-v1"  # optimizer.pt: {"format": this, <optimizer key>: its state keyed by parameter name}


def named_optimizer_state(model, optimizer) -> dict:
    """What optimizer.pt holds for an unsharded model: each torch optimizer's state dict keyed by
    parameter name (torch.distributed.checkpoint.state_dict.get_optimizer_state_dict), as DCP keys
    it, so it loads into a model sharded in any way without a map of parameter positions."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {"format": OPTIMIZER_FORMAT,
            **{key: get_optimizer_state_dict(model, opt) for key, opt in _optimizers(optimizer).items()}}


def migrate_index_keyed(model, optimizer, saved: dict) -> dict:
    """An optimizer.pt of checkpoints saved before 2026-12-03 (torch's optimizer.state_dict(): state
    and param_groups by parameter index) in the by-name form. Indices follow the optimizer's
    parameter order, which optim.build_optimizer derives from parameter names, so index i is the same
    parameter in this model whatever its sharding. Raises ValueError when the counts disagree."""
    names = {id(p): n for n, p in model.named_parameters()}
    opts = _optimizers(optimizer)
    out = {"format": OPTIMIZER_FORMAT}
    for key, opt in opts.items():
        old = saved if len(opts) == 1 else saved[key]
        order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        if sum(len(g["params"]) for g in old["param_groups"]) != len(order):
            raise ValueError(f"optimizer.pt ({key}): {sum(len(g['params']) for g in old['param_groups'])} "
                             f"parameters saved, {len(order)} in this model")
        groups = [{**g, "params": [order[int(i)] for i in g["params"]]} for g in old["param_groups"]]
        out[key] = {"state": {order[int(i)]: s for i, s in old["state"].items()}, "param_groups": groups}
    return out


def load_named_optimizer_state(model, optimizer, saved: dict) -> bool:
    """optimizer.pt's contents into the optimizer of `model` (sharded or not: a sharded model takes
    its shards of the full tensors). Returns True when `saved` was index-keyed and migrated
    (migrate_index_keyed), for the caller to log."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    migrated = saved.get("format") != OPTIMIZER_FORMAT
    if migrated:
        saved = migrate_index_keyed(model, optimizer, saved)
    options = StateDictOptions(full_state_dict=True) if is_sharded(model) else None
    for key, opt in _optimizers(optimizer).items():
        set_optimizer_state_dict(model, opt, saved[key], options=options)
    return migrated


def consolidated_weights(ckpt_dir: Path, out_dir: Path) -> Path:
    """Write the weights of a DCP checkpoint folder as out_dir/model.safetensors (fp32, one file,
    the names and tied-weight layout save_pretrained writes), built from ckpt_dir's config.json; no
    process group needed. Returns the file. Raises FileNotFoundError when ckpt_dir holds no DCP
    checkpoint."""
    import shutil
    import tempfile

    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (ckpt_dir / DCP_METADATA).is_file():
        raise FileNotFoundError(f"{ckpt_dir}: no sharded checkpoint there (no {DCP_METADATA})")
    config = AutoConfig.from_pretrained(str(ckpt_dir))
    with torch.device("meta"):  # no random init of billions of weights: every one is loaded below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to_empty(device="cpu")  # non-persistent buffers (RoPE) stay unset: only weights are written
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt_dir), no_dist=True)
    model.load_state_dict(state["model"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        model.save_pretrained(tmp, max_shard_size="1000GB")
        shutil.move(Path(tmp) / "model.safetensors", out_dir / "model.safetensors")
    return out_dir / "model.safetensors"
