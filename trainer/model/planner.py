"""Compute planner: from a budget (FLOPs or GPU-hours) to a model preset, token count, batch and lr.

The allocation follows DeepSeek LLM (Bi et al. 2024, arXiv 2401.02954, section 3), which measures
model scale as non-embedding FLOPs per token

    M = 72 n_layer d_model^2 + 12 n_layer d_model seq_len        (section 3.2, eq. 2)

so that compute is C = M D (D = training tokens), and fits (eqs. 1 and 4)

    B_opt  = 0.2920 C^0.3271   (batch, tokens)       lr_opt = 0.3118 C^-0.1250
    M_opt  = 0.1715 C^0.5243                         D_opt  = 5.8316 C^0.4757

The Chinchilla rule (Hoffmann et al. 2022, arXiv 2203.15556: about 20 tokens per parameter, with
C = 6 N D) is shown beside it for comparison; it does not drive the plan.

Memory: for the chosen preset on --gpus GPUs of --gpu's memory (trainer.model.llama.training_memory),
DDP needs the whole training state on each GPU, FSDP divides it by the GPUs; the plan picks the
strategy (FSDP when DDP does not fit or the model is past FSDP_AUTO_PARAMS), the largest
micro-batch that fits, activation checkpointing only when nothing fits without it, and says how many
GPUs FSDP needs at least.

A budget that would read --corpus_tokens more than MAX_EPOCHS times is planned by
trainer.model.data_limit (the preset the budget reads nearest MAX_EPOCHS times that still trains,
its tokens capped there); Plan.why says which criterion chose the model.

`plan` is a pure function of its arguments; trainer.model.plan_output turns a plan into the config
keys `run` reads (`plan_to_config`) and presents it (`format_table`, `plan_json`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from trainer.config.schema import model_label, preset_changes
from trainer.model.data_limit import (  # noqa: F401  (MAX_EPOCHS, REPEATED_DATA_TRAIN: plan_output's and tests')
    MAX_EPOCHS,
    MAX_GOOD_EPOCHS,
    MIN_TOKENS_PER_PARAM,
    REPEATED_DATA_TRAIN,
    data_limited_preset,
)
from trainer.model.llama import (
    FSDP_AUTO_PARAMS,
    GPU_MEMORY_GB,
    PEAK_FLOPS,
    PRESETS,
    Shape,
    flops_per_token,
    n_params,
    training_memory,
)

# DeepSeek LLM, arXiv 2401.02954: eq. 1 (hyperparameters) and eq. 4 (model/data allocation).
BATCH_COEF, BATCH_EXP = 0.2920, 0.3271
LR_COEF, LR_EXP = 0.3118, -0.1250
M_COEF, M_EXP = 0.1715, 0.5243
D_COEF, D_EXP = 5.8316, 0.4757
# The IsoFLOP and hyperparameter experiments behind those fits span roughly 1e17 to 3e20 FLOPs
# (DeepSeek LLM figures 3-4); outside that range the numbers are extrapolations.
FIT_RANGE = (1e17, 3e20)
# DeepSeek LLM section 2.3: lr reaches its maximum after 2000 warmup steps. Short runs cannot
# spend 2000 steps warming up; capping at 5% of the steps is a judgement call, not a fit.
WARMUP_STEPS = 2000
WARMUP_MAX_FRACTION = 0.05
# Hoffmann et al. 2022 (Chinchilla), arXiv 2203.15556, table 3: ~20 tokens per parameter.
CHINCHILLA_TOKENS_PER_PARAM = 20.0
DEFAULT_VOCAB = 32000  # TokenizerConfig.vocab_size default; only parameter counts and lm_head FLOPs use it
# Micro-batches (sequences per GPU per forward) tried, largest first; 16 is what the loop takes when
# train.micro_batch_size is 0 (trainer/training/loop.py batch_geometry), so a plan that fits it writes none.
MICRO_BATCHES = (16, 8, 4, 2, 1)
MAX_GPUS = 4096  # the GPU counts FSDP is tried on: powers of two up to this


@dataclass(frozen=True)
class MemoryFit:
    """How one strategy holds the chosen model on GPUs of the plan's kind: the largest micro-batch
    that fits, without activation checkpointing when any does (it costs ~1/3 more compute)."""
    strategy: str  # ddp or fsdp
    shards: int  # GPUs the training state is divided over: 1 for ddp, the plan's gpus for fsdp
    fits: bool
    micro_batch_size: int  # most sequences per GPU per forward (train.micro_batch_size); 1 when nothing fits
    activation_checkpointing: bool
    gb_per_gpu: float  # predicted peak per GPU, 1e9 bytes (trainer.model.llama.training_memory, overhead included)


@dataclass(frozen=True)
class Chinchilla:
    """The Chinchilla-optimal choice for the same compute (the plan's M x D read as Chinchilla's
    6 N D, N counting all parameters, embeddings included), for comparison."""
    params: float  # N with C = 6 N D and D = 20 N, i.e. N = sqrt(C / 120)
    tokens: float  # D = 20 N
    preset: str  # the preset whose total parameter count is nearest N (log distance)
    plan_tokens_per_param: float  # the DeepSeek plan's tokens / its model's total parameters


@dataclass(frozen=True)
class Plan:
    """A training plan. Inputs are echoed back; the rest is derived (never written into Config)."""
    # inputs
    seq_len: int
    gpus: int
    gpu: str
    mfu: float
    price_per_gpu_hour: float | None
    vocab_size: int
    corpus_tokens: int | None
    basis: str  # what fixed the plan: compute, gpu_hours, preset, tokens or preset+tokens
    compute_budget: float  # C (DeepSeek measure, M x D) the plan aims at, before rounding to whole steps
    # DeepSeek optimum for compute_budget
    m_opt: float  # optimal non-embedding FLOPs per token
    d_opt: float  # optimal tokens
    batch_opt: float  # optimal batch, tokens
    lr_opt: float  # optimal peak learning rate
    # chosen model
    preset: str
    shape: Shape  # the preset's, or a custom one (config.model_shape) in its place
    why: str  # why this preset: the criterion that picked it (with a corpus that limits the plan, how)
    model: str  # for people: the preset, with the model.* numbers of a custom shape (config.model_label)
    non_embedding_flops_per_token: float  # M of the chosen preset at seq_len
    train_flops_per_token: float  # what the GPUs execute per token (trainer.model.llama.flops_per_token, with lm_head)
    params: int  # total parameters at vocab_size
    # schedule
    batch_tokens: int  # batch_opt rounded to a multiple of seq_len * gpus
    steps: int
    warmup_steps: int
    tokens: int  # steps * batch_tokens
    lr: float  # lr_opt to three significant figures
    compute: float  # M x tokens: what the plan actually spends, DeepSeek measure
    # data, time, money
    epochs: float | None  # tokens / corpus_tokens
    wall_hours: float
    gpu_hours: float
    cost: float | None
    chinchilla: Chinchilla
    # memory (trainer.model.llama.training_memory) on gpus x gpu
    strategy: str  # ddp or fsdp: what train.strategy should be
    fits: bool  # the strategy, micro-batch and checkpointing below fit in gpu_memory_gb
    micro_batch_size: int  # sequences per GPU per forward
    activation_checkpointing: bool
    memory_gb_per_gpu: float  # predicted peak per GPU with the above, 1e9 bytes
    gpu_memory_gb: float  # trainer.model.llama.GPU_MEMORY_GB[gpu]
    ddp: MemoryFit
    fsdp: MemoryFit  # over the plan's gpus
    min_gpus_fsdp: int | None  # fewest GPUs (power of two) that hold it with FSDP at micro-batch 1; None: none
    min_gpus_fsdp_ac: int | None  # the same with activation checkpointing
    warnings: tuple[str, ...]


def non_embedding_flops_per_token(shape: Shape, seq_len: int) -> float:
    """DeepSeek LLM's M (arXiv 2401.02954, eq. 2): 72 n_layer d^2 + 12 n_layer d seq_len.

    72 d^2 = 6 x 12 d^2 counts a standard layer's weights (4 d^2 attention + 8 d^2 SwiGLU at
    d_ffn = 8/3 d); presets with GQA or a rounded d_ffn differ from their real count by a few percent.
    The lm_head is left out, unlike trainer.model.llama.flops_per_token.
    """
    n, d = shape.n_layer, shape.d_model
    return 72.0 * n * d * d + 12.0 * n * d * seq_len


def deepseek_optimum(compute: float) -> dict[str, float]:
    """DeepSeek LLM's fitted optimum for a compute budget C (FLOPs, M x D measure)."""
    return {
        "batch_tokens": BATCH_COEF * compute ** BATCH_EXP,
        "lr": LR_COEF * compute ** LR_EXP,
        "m": M_COEF * compute ** M_EXP,
        "tokens": D_COEF * compute ** D_EXP,
    }


def chinchilla_optimum(compute: float) -> tuple[float, float]:
    """(params, tokens) with C = 6 N D and D = 20 N (Hoffmann et al. 2022)."""
    params = math.sqrt(compute / (6.0 * CHINCHILLA_TOKENS_PER_PARAM))
    return params, CHINCHILLA_TOKENS_PER_PARAM * params


def round_batch(batch_tokens: float, seq_len: int, gpus: int) -> int:
    """Nearest multiple of seq_len * gpus (every rank gets whole sequences), at least one."""
    unit = seq_len * gpus
    return max(1, round(batch_tokens / unit)) * unit


BATCH_TOLERANCE = 0.05  # how far whole_micro_batches may move the batch from the fit's optimum (a judgement call)


def whole_micro_batches(batch_tokens: float, seq_len: int, gpus: int, micro_max: int) -> int:
    """batch_tokens rounded to whole sequences per GPU that split into the largest micro-batch of
    micro_max, micro_max/2, ... 1 whose rounding moves the batch by at most BATCH_TOLERANCE (a prime
    number of sequences per GPU would make the loop run them one at a time). Tokens; at least one
    sequence per GPU."""
    per_rank = batch_tokens / (seq_len * gpus)
    m = micro_max
    while m > 1 and abs(max(1, round(per_rank / m)) * m - per_rank) > BATCH_TOLERANCE * per_rank:
        m //= 2
    return max(1, round(per_rank / m)) * m * seq_len * gpus


def _micro(per_rank: int, cap: int) -> int:
    """The micro-batch the loop runs for `per_rank` sequences per GPU and train.micro_batch_size=cap:
    the largest divisor of per_rank up to cap (trainer/training/loop.py batch_geometry)."""
    return max(k for k in range(1, min(cap, per_rank) + 1) if per_rank % k == 0)


def fit_memory(shape: Shape, vocab_size: int, seq_len: int, gpu_gb: float, strategy: str, shards: int,
               per_rank: int) -> MemoryFit:
    """The first of MICRO_BATCHES (up to per_rank, the sequences per GPU per step) that fits in
    gpu_gb, trying without activation checkpointing first; fits=False (micro-batch 1, with
    checkpointing) when none does. The memory is the micro-batch's; the loop may run a smaller one
    (_micro), never a larger."""
    for checkpointing in (False, True):
        for m in [m for m in MICRO_BATCHES if m <= per_rank] or [1]:
            gb = training_memory(shape, vocab_size, seq_len, m, shards, checkpointing)["total"] / 1e9
            if gb <= gpu_gb:
                return MemoryFit(strategy, shards, True, m, checkpointing, gb)
    return MemoryFit(strategy, shards, False, 1, True, gb)


def min_gpus_fsdp(shape: Shape, vocab_size: int, seq_len: int, gpu_gb: float, checkpointing: bool) -> int | None:
    """Fewest GPUs of gpu_gb, a power of two up to MAX_GPUS, that hold the model with FSDP at
    micro-batch 1; None when none does (one sequence's activations alone are too large)."""
    g = 1
    while g <= MAX_GPUS:
        if training_memory(shape, vocab_size, seq_len, 1, g, checkpointing)["total"] / 1e9 <= gpu_gb:
            return g
        g *= 2
    return None


def memory_plan(shape: Shape, vocab_size: int, seq_len: int, gpu: str, gpus: int, batch_tokens: int) -> dict:
    """The Plan's memory fields for a model of `shape` on `gpus` x `gpu`. Several GPUs: FSDP when DDP does not
    fit one GPU without activation checkpointing or the model has FSDP_AUTO_PARAMS parameters or
    more (as train.strategy=auto decides). One GPU: DDP whenever it fits (with checkpointing if it
    must), since FSDP over one rank shards nothing (sharding.resolve_strategy); FSDP otherwise,
    which the warning turns into a GPU count."""
    gpu_gb = GPU_MEMORY_GB[gpu]
    per_rank = max(1, batch_tokens // seq_len // gpus)
    ddp = fit_memory(shape, vocab_size, seq_len, gpu_gb, "ddp", 1, per_rank)
    fsdp = fit_memory(shape, vocab_size, seq_len, gpu_gb, "fsdp", gpus, per_rank)
    big = n_params(shape, vocab_size)["total"] >= FSDP_AUTO_PARAMS
    if gpus == 1:  # nothing to shard over: DDP's fit, or FSDP's (the same numbers) named as what it needs
        chosen = ddp if ddp.fits else fsdp
    else:  # checkpointing costs ~1/3 more compute; sharding costs ~1/2 more communication (Zhao et al. 2023)
        chosen = ddp if ddp.fits and not ddp.activation_checkpointing and not big else fsdp
    return {
        "strategy": chosen.strategy, "fits": chosen.fits, "micro_batch_size": chosen.micro_batch_size,
        "activation_checkpointing": chosen.activation_checkpointing, "memory_gb_per_gpu": chosen.gb_per_gpu,
        "gpu_memory_gb": gpu_gb, "ddp": ddp, "fsdp": fsdp,
        "min_gpus_fsdp": min_gpus_fsdp(shape, vocab_size, seq_len, gpu_gb, False),
        "min_gpus_fsdp_ac": min_gpus_fsdp(shape, vocab_size, seq_len, gpu_gb, True),
    }


def _nearest(values: dict[str, float], target: float | dict[str, float]) -> str:
    """Key whose value is nearest `target` in log distance (target may differ per key)."""
    def dist(k):
        t = target[k] if isinstance(target, dict) else target
        return abs(math.log(values[k]) - math.log(t))
    return min(values, key=dist)


def _positive(name: str, value, integer: bool = False):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number (got {value!r})")
    if integer:
        if value != int(value):
            raise ValueError(f"{name} must be a whole number (got {value!r})")
        return int(value)
    return float(value)


def plan(compute=None, gpu_hours=None, gpu="h100", mfu=0.4, preset=None, tokens=None, seq_len=1024,
         corpus_tokens=None, gpus=1, price_per_gpu_hour=None, vocab_size=DEFAULT_VOCAB, shape=None) -> Plan:
    """Plan a run from a budget and/or a fixed model or token count.

    Give one of: `compute` (FLOPs, DeepSeek's M x D measure) or `gpu_hours` (total over all GPUs,
    turned into FLOPs with PEAK_FLOPS[gpu] x mfu), optionally with `preset` or `tokens` fixed; or,
    without a budget, `preset` and/or `tokens`: one alone gets the compute for which DeepSeek's fit
    makes it optimal, both together fix C = M x tokens.

    With a budget and neither fixed, the preset is the one nearest (log distance in M) to M_opt of
    the compute it would get, and tokens fill the budget. `gpu_hours` budgets count the FLOPs the
    GPUs really execute (with the lm_head), so the plan's wall time matches the hours asked for.
    `shape` (with `preset`: a config's custom shape, config.model_shape) is planned in the preset's
    place: its FLOPs, parameters and memory are counted; the preset's name labels it (model_name).
    """
    compute, gpu_hours, gpu, mfu, tokens, seq_len, corpus_tokens, gpus, vocab_size = _validated_inputs(
        compute, gpu_hours, gpu, mfu, preset, tokens, seq_len, corpus_tokens, gpus, price_per_gpu_hour, vocab_size)
    if shape is not None and preset is None:
        raise ValueError("shape: a custom shape is planned in the place of a preset; give preset too")
    shapes = PRESETS if shape is None else {**PRESETS, preset: shape}
    m = {k: non_embedding_flops_per_token(s, seq_len) for k, s in shapes.items()}
    f = {k: flops_per_token(s, vocab_size, seq_len) for k, s in shapes.items()}
    peak = PEAK_FLOPS[gpu]
    hw_flops = None if gpu_hours is None else gpu_hours * 3600.0 * peak * mfu
    tokens_of = _tokens_per_preset(m, f, compute, hw_flops, tokens)
    chosen, why, max_tokens = _choose_preset(m, f, tokens_of, compute, hw_flops, preset, tokens, corpus_tokens,
                                             {k: n_params(s, vocab_size)["total"] for k, s in shapes.items()})
    target_tokens, c, basis = _target(m[chosen], tokens_of, compute, hw_flops, preset, chosen, max_tokens)

    opt = deepseek_optimum(c)
    batch, steps, warmup = _schedule(opt["batch_tokens"], target_tokens, shapes[chosen], vocab_size, seq_len, gpu, gpus,
                                     max_tokens)
    planned_tokens = steps * batch
    actual_c = m[chosen] * planned_tokens

    wall_seconds = planned_tokens * f[chosen] / (gpus * peak * mfu)
    wall_hours = wall_seconds / 3600.0
    used_gpu_hours = wall_hours * gpus
    cost = None if price_per_gpu_hour is None else used_gpu_hours * float(price_per_gpu_hour)
    params = n_params(shapes[chosen], vocab_size)["total"]

    ch_params, ch_tokens = chinchilla_optimum(actual_c)
    chinchilla = Chinchilla(
        params=ch_params, tokens=ch_tokens,
        preset=_nearest({k: n_params(s, vocab_size)["total"] for k, s in PRESETS.items()}, ch_params),
        plan_tokens_per_param=planned_tokens / params,
    )

    epochs = None if corpus_tokens is None else planned_tokens / corpus_tokens
    p = Plan(
        seq_len=seq_len, gpus=gpus, gpu=gpu, mfu=mfu, price_per_gpu_hour=price_per_gpu_hour,
        vocab_size=vocab_size, corpus_tokens=corpus_tokens, basis=basis, compute_budget=c,
        m_opt=opt["m"], d_opt=opt["tokens"], batch_opt=opt["batch_tokens"], lr_opt=opt["lr"],
        preset=chosen, shape=shapes[chosen], why=why, model=model_label(chosen, preset_changes(chosen, shapes[chosen])),
        non_embedding_flops_per_token=m[chosen], train_flops_per_token=f[chosen], params=params, batch_tokens=batch,
        steps=steps, warmup_steps=warmup, tokens=planned_tokens, lr=float(f"{opt['lr']:.3g}"), compute=actual_c,
        epochs=epochs, wall_hours=wall_hours, gpu_hours=used_gpu_hours, cost=cost,
        chinchilla=chinchilla, warnings=(), **memory_plan(shapes[chosen], vocab_size, seq_len, gpu, gpus, batch),
    )
    return replace(p, warnings=plan_warnings(p, target_tokens, data_limited=max_tokens is not None))


def _validated_inputs(compute, gpu_hours, gpu, mfu, preset, tokens, seq_len, corpus_tokens, gpus,
                      price_per_gpu_hour, vocab_size) -> tuple:
    """plan's arguments checked, every problem a ValueError naming the argument: (compute,
    gpu_hours, gpu, mfu, tokens, seq_len, corpus_tokens, gpus, vocab_size), with tokens,
    corpus_tokens, seq_len, gpus and vocab_size as ints, compute, gpu_hours and mfu as floats
    (None where not given) and gpu lower-cased. preset and price_per_gpu_hour are only checked."""
    compute = _positive("compute", compute)
    gpu_hours = _positive("gpu_hours", gpu_hours)
    tokens = _positive("tokens", tokens)
    tokens = None if tokens is None else int(round(tokens))
    corpus_tokens = _positive("corpus_tokens", corpus_tokens)
    corpus_tokens = None if corpus_tokens is None else int(round(corpus_tokens))
    seq_len = _positive("seq_len", seq_len, integer=True)
    gpus = _positive("gpus", gpus, integer=True)
    vocab_size = _positive("vocab_size", vocab_size, integer=True)
    mfu = _positive("mfu", mfu)
    if price_per_gpu_hour is not None and (isinstance(price_per_gpu_hour, bool) or not isinstance(
            price_per_gpu_hour, (int, float)) or not math.isfinite(price_per_gpu_hour) or price_per_gpu_hour < 0):
        raise ValueError(f"price_per_gpu_hour must be a number >= 0 (got {price_per_gpu_hour!r})")
    if seq_len is None or seq_len < 8:
        raise ValueError(f"seq_len must be at least 8 (got {seq_len!r})")
    if gpus is None:
        raise ValueError("gpus must be at least 1")
    if mfu is None or mfu > 1:
        raise ValueError(f"mfu must be in (0, 1] (got {mfu!r})")
    if not isinstance(gpu, str) or gpu.lower() not in PEAK_FLOPS:
        raise ValueError(f"gpu must be one of {', '.join(PEAK_FLOPS)} (got {gpu!r})")
    gpu = gpu.lower()
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)} (got {preset!r})")
    if compute is not None and gpu_hours is not None:
        raise ValueError("compute: give either compute or gpu_hours, not both")
    budget_given = compute is not None or gpu_hours is not None
    if budget_given and preset is not None and tokens is not None:
        raise ValueError("tokens: a budget with both preset and tokens fixed is over-determined; drop one of the three")
    if not budget_given and preset is None and tokens is None:
        raise ValueError("compute: give compute, gpu_hours, preset or tokens")
    return compute, gpu_hours, gpu, mfu, tokens, seq_len, corpus_tokens, gpus, vocab_size


def _tokens_per_preset(m: dict[str, float], f: dict[str, float], compute: float | None, hw_flops: float | None,
                       tokens: int | None) -> dict[str, float] | None:
    """The tokens each preset would train on, given what is fixed: `tokens` itself; or the budget
    divided by the preset's FLOPs per token (f, what the GPUs execute, for a gpu_hours budget turned
    into hw_flops; m, DeepSeek's M, for a compute budget). None for a preset alone (plan decides)."""
    if tokens is not None:
        return {k: float(tokens) for k in PRESETS}
    if hw_flops is not None:
        return {k: hw_flops / f[k] for k in PRESETS}
    if compute is not None:
        return {k: compute / m[k] for k in PRESETS}
    return None


def _choose_preset(m: dict[str, float], f: dict[str, float], tokens_of: dict[str, float] | None,
                   compute: float | None, hw_flops: float | None, preset: str | None, tokens: int | None,
                   corpus_tokens: int | None, params: dict[str, float]) -> tuple[str, str, float | None]:
    """(the plan's preset, why, the most tokens it may train on or None): `preset` when fixed; for
    tokens alone, the one nearest M_opt of the compute for which D_opt(C) = tokens; for a budget and
    tokens, the model that spends the budget on those tokens; for a budget alone, the one nearest
    M_opt of the compute it would get, made data-limited (data_limit.data_limited_preset, its tokens
    capped at MAX_EPOCHS passes) when that would read corpus_tokens more than MAX_EPOCHS times.
    m and f: FLOPs per token per preset, as in _tokens_per_preset; params: parameters per preset."""
    if preset is not None:
        return preset, "the preset asked for", None
    if compute is None and hw_flops is None:  # tokens alone: the compute for which D_opt(C) = tokens
        c = (tokens / D_COEF) ** (1.0 / D_EXP)
        return (_nearest(m, M_COEF * c ** M_EXP), f"nearest DeepSeek's optimal model for the compute whose optimal "
                f"tokens are {tokens:.3g} (M_opt = {M_COEF} C^{M_EXP}, D_opt = {D_COEF} C^{D_EXP})", None)
    if tokens is not None:  # budget and tokens: the model that spends the budget on those tokens
        chosen = _nearest(f, hw_flops / tokens) if hw_flops is not None else _nearest(m, compute / tokens)
        return chosen, f"the model that spends the budget on {tokens:.3g} tokens", None
    # budget alone: the preset nearest M_opt of the compute it would get
    chosen = _nearest(m, {k: M_COEF * (m[k] * tokens_of[k]) ** M_EXP for k in PRESETS})
    if corpus_tokens is not None and tokens_of[chosen] > MAX_EPOCHS * corpus_tokens:
        return data_limited_preset(tokens_of, corpus_tokens, {k: params[k] for k in PRESETS}, chosen)
    return chosen, (f"compute-optimal: nearest DeepSeek's optimal non-embedding FLOPs per token for the compute it "
                    f"gets (M_opt = {M_COEF} C^{M_EXP})"), None


def _target(m_chosen: float, tokens_of: dict[str, float] | None, compute: float | None, hw_flops: float | None,
            preset: str | None, chosen: str, max_tokens: float | None = None) -> tuple[float, float, str]:
    """(target tokens, compute budget C in FLOPs (M x D), basis) for the chosen preset, whose M is
    m_chosen. A preset alone gets the compute for which M_opt(C) = M (DeepSeek eq. 4); otherwise
    the tokens it would train on (at most max_tokens) fix C = M x tokens. basis names what fixed the
    plan (Plan.basis)."""
    if tokens_of is None:  # preset alone: the compute for which M_opt(C) = M
        c = (m_chosen / M_COEF) ** (1.0 / M_EXP)
        return c / m_chosen, c, "preset"
    target_tokens = tokens_of[chosen] if max_tokens is None else min(tokens_of[chosen], max_tokens)
    basis = ("gpu_hours" if hw_flops is not None else "compute" if compute is not None
             else "preset+tokens" if preset is not None else "tokens")
    return target_tokens, m_chosen * target_tokens, basis


def _schedule(batch_opt: float, target_tokens: float, shape: Shape, vocab_size: int, seq_len: int, gpu: str,
              gpus: int, max_tokens: float | None = None) -> tuple[int, int, int]:
    """(batch_tokens, steps, warmup_steps): DeepSeek's batch_opt (tokens) rounded to whole sequences
    per GPU that split into the micro-batch memory allows (whole_micro_batches), as many whole steps
    as come nearest target_tokens (at least one; no more than max_tokens hold), and warmup capped at WARMUP_STEPS and
    WARMUP_MAX_FRACTION of the steps (DeepSeek LLM section 2.3)."""
    batch = round_batch(batch_opt, seq_len, gpus)
    micro = memory_plan(shape, vocab_size, seq_len, gpu, gpus, batch)["micro_batch_size"]
    batch = whole_micro_batches(batch_opt, seq_len, gpus, micro)
    steps = max(1, round(target_tokens / batch))
    if max_tokens is not None:  # a data-limited plan never reads past its passes (the run's max_epochs)
        steps = max(1, min(steps, int(max_tokens // batch)))
    warmup = min(WARMUP_STEPS, int(WARMUP_MAX_FRACTION * steps))
    return batch, steps, warmup


def plan_warnings(p: Plan, target_tokens: float, data_limited: bool = False) -> tuple[str, ...]:
    """What a reader of plan `p` should know: too many epochs, compute outside the fits' range, no
    preset near the optimum (unless the corpus chose the preset: `data_limited`, p.why says how), a
    batch rounded far up, too few steps, whole steps far from the `target_tokens` the budget asked for."""
    warnings = []
    if p.epochs is not None and p.epochs > MAX_GOOD_EPOCHS:
        warnings.append(f"the plan reads the corpus {p.epochs:.1f} times; beyond ~{MAX_GOOD_EPOCHS:g} epochs repeated "
                        "data is worth much less than fresh data (Muennighoff et al. 2023): more text would train it "
                        "better")
    c = p.compute_budget
    if not FIT_RANGE[0] <= c <= FIT_RANGE[1]:
        warnings.append(f"compute {c:.2e} is outside the {FIT_RANGE[0]:.0e}-{FIT_RANGE[1]:.0e} FLOPs the DeepSeek fits "
                        "were made on; batch and lr are extrapolated")
    ratio = p.non_embedding_flops_per_token / p.m_opt
    if not 1 / 3 <= ratio <= 3 and not data_limited:
        warnings.append(f"{p.model} has {ratio:.2g}x the optimal non-embedding FLOPs per token "
                        f"({p.m_opt:.3g}); no preset is close")
    if p.batch_tokens > 1.5 * p.batch_opt:
        warnings.append(f"batch rounded up from {p.batch_opt:.0f} to {p.batch_tokens} tokens "
                        f"(seq_len {p.seq_len} x {p.gpus} GPU(s)); consider a shorter seq_len")
    if p.steps < 100:
        warnings.append(f"only {p.steps} optimizer steps; the plan is too small for the fitted batch size")
    if abs(p.tokens - target_tokens) > 0.05 * target_tokens:
        warnings.append(f"whole steps change tokens from {target_tokens:.3g} to {p.tokens:.3g}")
    if not p.fits:
        warnings.append(memory_warning(p))
    per_rank = max(1, p.batch_tokens // p.seq_len // p.gpus)
    if p.fits and 2 * _micro(per_rank, p.micro_batch_size) <= p.micro_batch_size:
        warnings.append(f"{per_rank} sequences per GPU split only into micro-batches of "
                        f"{_micro(per_rank, p.micro_batch_size)} (memory allows {p.micro_batch_size}): a batch_tokens "
                        f"that is a multiple of {p.micro_batch_size * p.seq_len * p.gpus} runs faster")
    return tuple(warnings)


def memory_warning(p: Plan) -> str:
    """Why plan `p` does not fit its GPUs, and how many it would need."""
    gpus = f"{p.gpus} x {p.gpu} ({p.gpu_memory_gb:g} GB each)"
    if p.min_gpus_fsdp_ac is None:
        return (f"{p.model} does not fit on any number of {p.gpu} at seq_len {p.seq_len}: one sequence's "
                f"activations and logits alone exceed {p.gpu_memory_gb:g} GB; use a shorter seq_len or a larger GPU")
    without = (f"{p.min_gpus_fsdp} without it" if p.min_gpus_fsdp is not None else "no number without it")
    return (f"{p.model} does not fit on {gpus}: {p.memory_gb_per_gpu:.0f} GB per GPU predicted with "
            f"{p.strategy}, micro-batch 1 and activation checkpointing; it needs at least {p.min_gpus_fsdp_ac} x "
            f"{p.gpu} with FSDP and activation checkpointing ({without})")
