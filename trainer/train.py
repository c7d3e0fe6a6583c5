"""The pretraining loop: one function, top to bottom, with explicit state.

Runs as one process per GPU under torchrun (or alone). DDP over NCCL on GPU, gloo on CPU. The
only host-device syncs are at log, eval and checkpoint steps; a non-finite gradient is detected
on the device and the fused AdamW skips the update there (GradScaler's found_inf mechanism).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer import checkpoint as ckpt
from trainer.config import Config, to_yaml
from trainer.dataset import BatchLoader, TokenSamples, validation_batches
from trainer.model import PRESETS, build_model, flops_per_token, llama_config, peak_flops, pick_attention
from trainer.schedule import lr_at
from trainer.storage import Storage, join

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly after a checkpoint; launchers should retry


class Preempted(SystemExit):
    def __init__(self):
        super().__init__(EXIT_PREEMPTED)


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    control: object = None  # a gloo group for small CPU-side agreements (stop flag)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: Config) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    control = None
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
        control = dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
    return Dist(rank, world, local_rank, device, control)


def micro_batch_size(cfg: Config, world: int) -> int:
    """Sequences per forward pass per rank: the configured value, else the largest divisor of the
    per-rank batch up to 16."""
    per_rank = cfg.train.batch_tokens // cfg.train.seq_len // world
    if cfg.train.micro_batch_size:
        return cfg.train.micro_batch_size
    return max(d for d in range(1, min(16, per_rank) + 1) if per_rank % d == 0)


def check_batch_geometry(cfg: Config, world: int) -> tuple[int, int, int]:
    """(samples per step, micro-batch size, accumulation steps), or ValueError naming the keys."""
    samples = cfg.train.batch_tokens // cfg.train.seq_len
    if samples % world:
        raise ValueError(f"train.batch_tokens={cfg.train.batch_tokens} is {samples} sequences of train.seq_len="
                         f"{cfg.train.seq_len}, which does not split evenly over {world} processes")
    micro = micro_batch_size(cfg, world)
    if (samples // world) % micro:
        raise ValueError(f"train.micro_batch_size={micro} does not divide the {samples // world} sequences "
                         f"each of {world} processes runs per step (train.batch_tokens / train.seq_len / world)")
    return samples, micro, samples // world // micro


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not norms, not biases), as in GPT-3 and LLaMA."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_checkpoint(local_dir: Path, model, optimizer, state: dict, cfg: Config, rng_states: list) -> None:
    from safetensors.torch import save_model

    if local_dir.exists():
        import shutil

        shutil.rmtree(local_dir)
    local_dir.mkdir(parents=True)
    save_model(model, str(local_dir / "model.safetensors"))
    torch.save(optimizer.state_dict(), local_dir / "optimizer.pt")
    torch.save(rng_states, local_dir / "rng.pt")
    (local_dir / "trainer_state.json").write_text(json.dumps(state, indent=1))
    (local_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    ckpt.write_manifest(local_dir, state["step"])


class StopFlag:
    """Set by SIGTERM/SIGINT; ranks agree on it at a step boundary so all stop at the same step."""

    def __init__(self):
        self.requested_at: float | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested_at is None:
            self.requested_at = time.time()
            print(f"received signal {signum}: stopping at the next step boundary to checkpoint", flush=True)

    def agreed(self, d: Dist) -> bool:
        flag = torch.tensor([1.0 if self.requested_at is not None else 0.0])
        if d.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=d.control)
        return bool(flag.item())


def train(cfg: Config, store: Storage, data_dir: Path, index: dict, tok_dir: Path, log=print) -> dict:
    """Pretrain from the newest complete checkpoint of run.id (or from scratch) to train.max_steps."""
    d = setup_distributed(cfg)
    t = cfg.train
    samples_per_step, micro, accum = check_batch_geometry(cfg, d.world)
    say = log if d.main else (lambda *a, **k: None)
    run_local = Path(cfg.storage.local_dir) / "runs" / cfg.run.id
    run_local.mkdir(parents=True, exist_ok=True)
    stop = StopFlag()

    # Model, optimizer -------------------------------------------------------------------------
    use_bf16 = t.dtype == "bf16" or (t.dtype == "auto" and d.device.type == "cuda")
    torch.manual_seed(t.seed)
    model_cfg = llama_config(cfg.model.preset, index["vocab_size"], t.seq_len, cfg.model.tie_embeddings,
                             eos_token_id=index["eos_id"])
    model = build_model(model_cfg, pick_attention(cfg.model.attn_implementation, d.device.type)).to(d.device)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                  eps=1e-8, fused=True)

    # Resume -----------------------------------------------------------------------------------
    step, tokens_seen, skipped_total, wall_before = 0, 0, 0, 0.0
    found = ckpt.fetch_newest(store, cfg.run.id, run_local / "resume", log=say) if d.main else None
    if d.world > 1:
        box = [found[0] if found else -1]
        dist.broadcast_object_list(box, src=0)
        if box[0] >= 0 and not d.main:  # other ranks read the checkpoint rank 0 verified
            found = box[0], ckpt.fetch_verified(store, cfg.run.id, box[0], run_local / f"resume-rank{d.rank}")
    if found:
        from safetensors.torch import load_model

        ckpt_step, ckpt_dir = found
        load_model(model, str(ckpt_dir / "model.safetensors"))
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location=d.device, weights_only=False))
        state = json.loads((ckpt_dir / "trainer_state.json").read_text())
        step, tokens_seen = state["step"], state["tokens_seen"]
        skipped_total, wall_before = state.get("skipped_steps", 0), state.get("wall_seconds", 0.0)
        rngs = torch.load(ckpt_dir / "rng.pt", weights_only=False)
        if len(rngs) == d.world:
            set_rng_state(rngs[d.rank])
        else:
            torch.manual_seed(t.seed + 1000 * step + d.rank)
        say(f"resumed from {ckpt.step_name(ckpt_step)} (saved by {state['world_size']} process(es), now {d.world})")
    else:
        torch.manual_seed(t.seed + d.rank)
        say("starting from scratch")

    train_model = ddp = model
    if d.world > 1:
        train_model = ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, gradient_as_bucket_view=True)
    compile_on = t.compile == "on" or (t.compile == "auto" and d.device.type == "cuda")
    if compile_on:
        train_model = torch.compile(train_model)

    # Data -------------------------------------------------------------------------------------
    train_samples = TokenSamples(data_dir, index, "train", t.seq_len)
    val_samples = TokenSamples(data_dir, index, "val", t.seq_len)
    if len(train_samples) == 0:
        raise ValueError(f"the training split has fewer than train.seq_len+1={t.seq_len + 1} tokens per shard")
    loader = BatchLoader(train_samples, t.seed, samples_per_step, d.rank, d.world, micro, d.device, step, t.max_steps)
    tokens_per_step = samples_per_step * t.seq_len
    shape = PRESETS[cfg.model.preset]
    flops_tok = flops_per_token(shape, model_cfg.vocab_size, t.seq_len, cfg.model.tie_embeddings)
    peak = peak_flops(torch.cuda.get_device_name(d.device)) if d.device.type == "cuda" else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    chars_per_token = index["chars"].get("val", 0) / max(1, index["tokens"]["val"])

    def evaluate() -> float | None:
        if len(val_samples) == 0:
            return None
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=d.device)
        with torch.no_grad():
            for batch in validation_batches(val_samples, t.eval_batches, micro, d.rank, d.world):
                batch = batch.to(d.device)
                with autocast:
                    logits = model(input_ids=batch[:, :-1]).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                       reduction="sum")
                total += torch.stack([loss.double(), torch.tensor(batch[:, 1:].numel(), device=d.device).double()])
        if d.world > 1:
            dist.all_reduce(total)
        model.train()
        return (total[0] / total[1]).item()

    metrics_path = run_local / "metrics.jsonl"
    if d.main:
        # Keep the bucket's history up to the resumed step: a killed run's later lines are dropped.
        old = store.read_text_or_none(f"runs/{cfg.run.id}/metrics.jsonl") or ""
        kept = [line for line in old.splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    uploader = ckpt.Uploader(store, cfg.run.id, cfg.checkpoint.keep_last, log=say)

    def flush_metrics():
        if d.main:
            store.upload_file(metrics_path, f"runs/{cfg.run.id}/metrics.jsonl")

    def checkpoint_now(background: bool):
        nonlocal last_ckpt_step
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise FloatingPointError(f"non-finite weights at step {step}: refusing to checkpoint them")
        rngs = [None] * d.world
        if d.world > 1:
            dist.all_gather_object(rngs, rng_state(), group=d.control)
        else:
            rngs = [rng_state()]
        if d.main:
            state = {"step": step, "tokens_seen": tokens_seen, "skipped_steps": skipped_total,
                     "world_size": d.world, "data_position": step * samples_per_step,
                     "wall_seconds": wall_before + time.time() - t_start}
            local = run_local / "staged" / ckpt.step_name(step)
            save_checkpoint(local, model, optimizer, state, cfg, rngs)
            flush_metrics()
            uploader.submit(local, step, background=background,
                            on_done=lambda s: _drop_staged(run_local / "staged", keep=ckpt.step_name(s)))
        last_ckpt_step = step

    # The loop ---------------------------------------------------------------------------------
    say(f"training {cfg.model.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
        f"on {d.world} x {d.device.type}, {samples_per_step} x {t.seq_len} tokens per step "
        f"({micro} per micro-batch, {accum} accumulation), steps {step} -> {t.max_steps}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), device=d.device)
    skipped = torch.zeros((), device=d.device)
    last_ckpt_step = step
    t_start = t_log = time.time()
    wait_at_log, steps_at_log = 0.0, step
    while step < t.max_steps:
        if d.world > 1 or stop.requested_at is not None:  # ranks agree every step (CPU gloo, no GPU sync)
            if stop.agreed(d):
                loader.close()
                if step > last_ckpt_step:
                    checkpoint_now(background=False)
                uploader.wait()
                flush_metrics()
                say(f"stopped at step {step} after a signal; checkpoint published, exiting with {EXIT_PREEMPTED}")
                raise Preempted()
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for k in range(accum):
            x, y = loader.next()
            sync = k == accum - 1 or d.world == 1
            with (ddp.no_sync() if not sync else nullcontext()):
                with autocast:
                    logits = train_model(input_ids=x).logits
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
        norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"), foreach=True)
        found_inf = (~torch.isfinite(norm)).float()
        optimizer.found_inf, optimizer.grad_scale = found_inf, None  # fused AdamW skips the update on device
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        skipped += found_inf
        step += 1
        tokens_seen += tokens_per_step

        if step % t.log_every_steps == 0 or step == t.max_steps:
            stats = torch.stack([loss_sum, skipped, norm.float()])
            if d.world > 1:
                dist.all_reduce(stats)
                stats /= torch.tensor([d.world, 1.0, d.world], device=d.device)
            loss_v, skipped_v, norm_v = stats.tolist()  # the sync point
            n_steps = step - steps_at_log
            skipped_total += int(skipped_v)
            if t.on_nonfinite == "fail" and skipped_v > 0:
                raise FloatingPointError(f"non-finite loss or gradient before step {step} (train.on_nonfinite=fail)")
            now = time.time()
            tok_s = n_steps * tokens_per_step / (now - t_log)
            row = {"step": step, "loss": round(loss_v / n_steps, 6), "lr": lr, "grad_norm": round(norm_v, 4),
                   "tok_per_s": round(tok_s, 1), "tokens": tokens_seen, "skipped_steps": skipped_total,
                   "data_wait": round((loader.wait_seconds - wait_at_log) / (now - t_log), 4)}
            if peak:
                row["mfu"] = round(tok_s * flops_tok / (d.world * peak), 4)
            if d.device.type == "cuda":
                row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(d.device) / 1e9, 2)
            if step % max(1, t.eval_every_steps or t.max_steps) == 0 or step == t.max_steps:
                val = evaluate()
                if val is not None:
                    row["val_loss"] = round(val, 6)
                    row["val_bpc"] = round(val / math.log(2) / chars_per_token, 6) if chars_per_token else None
            if d.main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                say(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            loss_sum.zero_()
            skipped.zero_()
            t_log, wait_at_log, steps_at_log = time.time(), loader.wait_seconds, step
        if step % t.checkpoint_every_steps == 0 or step == t.max_steps:
            checkpoint_now(background=cfg.checkpoint.upload_async and step < t.max_steps)

    loader.close()
    uploader.wait()
    flush_metrics()
    if d.world > 1:
        dist.barrier()
    return {"step": step, "tokens_seen": tokens_seen, "skipped_steps": skipped_total,
            "run_url": store.url(f"runs/{cfg.run.id}")}


def _drop_staged(staged_root: Path, keep: str):
    """Staged local copies of published checkpoints are not needed once the bucket has them."""
    import shutil

    for p in staged_root.iterdir() if staged_root.is_dir() else []:
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
