"""Model preparation for training, as torchtitan's `parallelize`: build the task's model (on the
meta device first, to resolve train.strategy from its size), activation checkpointing, float8,
per-block compile, FSDP sharding with rank 0's starting weights, or DDP, and torch.compile."""

from __future__ import annotations

import torch

from trainer.config import TrainConfig
from trainer.parallel.distributed import Dist
from trainer.parallel.fsdp import (
    decoder_layers,
    ensure_process_group,
    materialize,
    resolve_strategy,
    shard,
    shard_root,
)

# torch.compile's backend for train.compile. Tests set "eager": the same dynamo tracing, guards and
# recompiles, without inductor's code generation (tens of seconds a graph on a CPU).
COMPILE_BACKEND = "inductor"


def build(task, hp: TrainConfig, d: Dist, bf16: bool) -> tuple[torch.nn.Module, object, str]:
    """(model ready for the optimizer, tokenizer, strategy): train.strategy resolved from the model's
    size on the meta device; DDP builds the model on d.device, FSDP shards the meta model first."""
    model, tokenizer = task.build_model(d.device, empty=True)  # the shape, no storage
    strategy = resolve_strategy(hp.strategy, sum(p.numel() for p in model.parameters()), d.world)
    if strategy == "ddp":
        torch.manual_seed(hp.seed)  # the same starting weights on every rank
        model, tokenizer = task.build_model(d.device)
    prepare(model, task, hp, d, bf16, strategy)
    return model, tokenizer, strategy


def prepare(model, task, hp: TrainConfig, d: Dist, bf16: bool, strategy: str) -> None:
    """Activation checkpointing, float8 and, for strategy "fsdp", sharding, in place, before the
    optimizer sees the parameters. FSDP: `model` comes with its parameters on the meta device and
    leaves sharded, with this rank's shards of the starting weights (seed hp.seed) on d.device."""
    if hp.dropout:
        residual_dropout(model, hp.dropout)
    if hp.activation_checkpointing:
        # transformers' per-layer checkpointing (torch.utils.checkpoint, non-reentrant): layer
        # activations are recomputed in the backward instead of kept.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hp.float8:
        float8_training(model)
    if strategy == "fsdp":
        ensure_process_group(d.device)
        if compiles(hp.compile, d):
            for layer in decoder_layers(model):  # per block, before sharding, as torchtitan does
                layer.compile(backend=COMPILE_BACKEND)
        shard(model, bf16)
        materialize(model, lambda: _starting_weights(task, hp.seed), d.device)


def _starting_weights(task, seed: int) -> torch.nn.Module:
    """The task's starting model on the CPU (seed `seed`): what rank 0 broadcasts into a sharded
    model. Bit for bit the unsharded path's weights when that runs on CPU; on a GPU the unsharded
    path draws from the CUDA generator instead (the same distributions, other numbers)."""
    torch.manual_seed(seed)
    return task.build_model(torch.device("cpu"))[0]


def residual_dropout(model, p: float) -> int:
    """Dropout with probability `p` on each decoder layer's attention output and MLP output before
    they join the residual stream (GPT-2's resid_pdrop; Srivastava et al. 2014, JMLR 15), in training
    mode only. Forward hooks, so the module tree, the state dict and the export stay stock LLaMA
    (which has no residual dropout) and evaluation, samples and generation never drop. Dropout is the
    regulariser Xue et al. 2023 ("To Repeat or Not To Repeat", arXiv 2305.13230) found to resist
    the degradation of training on repeated data. Returns the number of modules hooked."""

    def drop(module, args, output):
        if not module.training:
            return None
        if isinstance(output, tuple):  # attention: (output (B, T, d_model), weights or None)
            return (torch.nn.functional.dropout(output[0], p, True), *output[1:])
        return torch.nn.functional.dropout(output, p, True)

    hooked = 0
    for layer in decoder_layers(model):
        for module in (layer.self_attn, layer.mlp):
            module.register_forward_hook(drop)
            hooked += 1
    return hooked


def float8_available(device: str) -> None:
    """Raise ValueError naming train.float8 unless torchao is installed and the GPU has FP8 tensor
    cores (compute capability 8.9+: Ada, Hopper and newer)."""
    from importlib.util import find_spec

    if find_spec("torchao") is None:
        raise ValueError("train.float8 needs torchao (pip install torchao); or set train.float8=false")
    if device == "cpu" or not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise ValueError("train.float8 needs a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                         "set train.float8=false here")


def float8_training(model) -> list[str]:
    """Swap the decoder layers' nn.Linear (dims multiples of 16) for torchao's Float8Linear, in
    place: matmuls in FP8 with dynamic tensorwise scales (Micikevicius et al. 2022, "FP8 formats for
    deep learning"), weights and their checkpoints unchanged (fp32 parameters under the same names).
    Embedding and lm_head stay in bf16, as torchtitan's float8 recipe keeps its output layer.
    Returns the converted module names. Raises ImportError without torchao."""
    from torchao.float8 import convert_to_float8_training

    converted = []

    def wanted(module, fqn: str) -> bool:
        ok = (isinstance(module, torch.nn.Linear) and ".layers." in f".{fqn}"
              and module.in_features % 16 == 0 and module.out_features % 16 == 0)
        if ok:
            converted.append(fqn)
        return ok

    convert_to_float8_training(model, module_filter_fn=wanted)
    return converted


def compiles(compile_setting: str, d: Dist) -> bool:
    return compile_setting == "on" or (compile_setting == "auto" and d.device.type == "cuda")


def wrap(loss_module: torch.nn.Module, d: Dist, compile_setting: str, strategy: str = "ddp", bf16: bool = False):
    """(the module training runs: DDP over several processes, compiled on GPU by default; the module
    evaluation runs: the same without DDP hooks). FSDP: the loss module becomes the root over the
    units prepare sharded (blocks compiled there)."""
    if strategy == "fsdp":
        shard_root(loss_module, bf16)
        return loss_module, loss_module
    train_model = eval_model = loss_module
    if d.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[d.local_rank] if d.device.type == "cuda" else None, gradient_as_bucket_view=True)
    if compiles(compile_setting, d):
        train_model, eval_model = (torch.compile(train_model, backend=COMPILE_BACKEND),
                                    torch.compile(loss_module, backend=COMPILE_BACKEND))
    return train_model, eval_model
