"""The pretraining loop: one function, top to bottom, with explicit state.

Runs as one process per GPU under torchrun (or alone). DDP over NCCL on GPU, gloo on CPU. The
only host-device syncs are at log, eval and checkpoint steps; a non-finite gradient is detected
on the device and the fused AdamW skips the update there (GradScaler's found_inf mechanism);
at log steps train.on_nonfinite decides whether skipped steps and loss spikes are only counted,
rolled back to the last checkpoint, or fatal. SIGTERM stops every rank at one step boundary with
a published checkpoint (exit 75).
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
from trainer.evaluate import val_chars_per_token
from trainer.model import PRESETS, build_model, flops_per_token, llama_config, peak_flops, pick_attention
from trainer.schedule import lr_at
from trainer.storage import Storage, join

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly after a checkpoint; launchers should retry
MAX_ROLLBACKS_IN_A_ROW = 3  # train.on_nonfinite=rollback gives up after this many without a new checkpoint


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


def shutdown_distributed() -> None:
    """Tear the process groups down before the interpreter exits. Left to interpreter shutdown,
    gloo's threads can be destroyed while joinable, and a rank dies with SIGABRT ("terminate called
    without an active exception") after its work is done, failing the whole torchrun."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


class CausalLMLoss(torch.nn.Module):
    """The HF model plus the next-token loss in one module, so torch.compile sees both: the fp32
    upcast and log-softmax fuse with the lm_head output instead of materialising fp32 logits
    (B x T x V x 4 bytes: 4 GB at 32 x 1024 x 32k). The HF model itself stays untouched."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.model(input_ids=input_ids).last_hidden_state  # (B, T, C)
        logits = self.model.lm_head(hidden)  # (B, T, V)
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


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
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 leftovers on GPU
    torch.manual_seed(t.seed)
    model_cfg = llama_config(cfg.model.preset, index["vocab_size"], t.seq_len, cfg.model.tie_embeddings,
                             eos_token_id=index["eos_id"])
    model = build_model(model_cfg, pick_attention(cfg.model.attn_implementation, d.device.type)).to(d.device)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                  eps=1e-8, fused=True)

    # Resume -----------------------------------------------------------------------------------
    def restore() -> dict | None:
        """Load the newest complete checkpoint (rank 0 verifies it, the others fetch that one) into
        the model, optimizer and RNG; return its trainer state, or None when the run has none."""
        found = ckpt.fetch_newest(store, cfg.run.id, run_local / "resume", log=say) if d.main else None
        if d.world > 1:
            box = [found[0] if found else -1]
            dist.broadcast_object_list(box, src=0)
            if box[0] >= 0 and not d.main:  # other ranks read the checkpoint rank 0 verified
                found = box[0], ckpt.fetch_verified(store, cfg.run.id, box[0], run_local / f"resume-rank{d.rank}")
        if not found:
            return None
        from safetensors.torch import load_model

        ckpt_dir = found[1]
        load_model(model, str(ckpt_dir / "model.safetensors"))
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location=d.device, weights_only=False))
        state = json.loads((ckpt_dir / "trainer_state.json").read_text())
        rngs = torch.load(ckpt_dir / "rng.pt", weights_only=False)
        if len(rngs) == d.world:
            set_rng_state(rngs[d.rank])
        else:
            torch.manual_seed(t.seed + 1000 * state["step"] + d.rank)
        return state

    step, tokens_seen, skipped_total, wall_before = 0, 0, 0, 0.0
    data_offset, loss_ema, spikes_total, rollbacks_total = 0, None, 0, 0
    state = restore()
    if state:
        step, tokens_seen = state["step"], state["tokens_seen"]
        skipped_total, wall_before = state.get("skipped_steps", 0), state.get("wall_seconds", 0.0)
        data_offset, loss_ema = state.get("data_offset", 0), state.get("loss_ema")
        spikes_total, rollbacks_total = state.get("spikes", 0), state.get("rollbacks", 0)
        say(f"resumed from {ckpt.step_name(step)} (saved by {state['world_size']} process(es), now {d.world})")
    else:
        torch.manual_seed(t.seed + d.rank)
        say("starting from scratch")

    loss_model = train_model = ddp = CausalLMLoss(model)
    if d.world > 1:
        train_model = ddp = torch.nn.parallel.DistributedDataParallel(
            loss_model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, gradient_as_bucket_view=True)
    compile_on = t.compile == "on" or (t.compile == "auto" and d.device.type == "cuda")
    if compile_on:
        train_model = torch.compile(train_model)
        loss_model = torch.compile(loss_model)  # eval: same graph without DDP hooks

    # Data -------------------------------------------------------------------------------------
    train_samples = TokenSamples(data_dir, index, "train", t.seq_len)
    val_samples = TokenSamples(data_dir, index, "val", t.seq_len)
    if len(train_samples) == 0:
        raise ValueError(f"the training split has fewer than train.seq_len+1={t.seq_len + 1} tokens per shard")
    # data_offset: steps of data skipped by rollbacks (train.on_nonfinite=rollback); 0 otherwise.
    loader = BatchLoader(train_samples, t.seed, samples_per_step, d.rank, d.world, micro, d.device,
                         step + data_offset, t.max_steps + data_offset)
    tokens_per_step = samples_per_step * t.seq_len
    shape = PRESETS[cfg.model.preset]
    flops_tok = flops_per_token(shape, model_cfg.vocab_size, t.seq_len, cfg.model.tie_embeddings)
    peak = peak_flops(torch.cuda.get_device_name(d.device)) if d.device.type == "cuda" else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    chars_per_token = val_chars_per_token(index)

    def evaluate() -> float | None:
        if len(val_samples) == 0:
            return None
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=d.device)
        with torch.no_grad():
            for batch in validation_batches(val_samples, t.eval_batches, micro, d.rank, d.world):
                batch = batch.to(d.device)
                with autocast:
                    loss = loss_model(batch[:, :-1], batch[:, 1:])
                n = batch[:, 1:].numel()
                total += torch.stack([loss.double() * n, torch.tensor(float(n), device=d.device, dtype=torch.float64)])
        if d.world > 1:
            dist.all_reduce(total)
        model.train()
        return (total[0] / total[1]).item()

    metrics_path, samples_path = run_local / "metrics.jsonl", run_local / "samples.jsonl"
    if d.main:
        # Keep the bucket's history up to the resumed step: a killed run's later lines are dropped.
        for path in (metrics_path, samples_path):
            old = store.read_text_or_none(f"runs/{cfg.run.id}/{path.name}") or ""
            kept = [line for line in old.splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
            path.write_text("".join(line + "\n" for line in kept))
    uploader = ckpt.Uploader(store, cfg.run.id, cfg.checkpoint.keep_last, log=say)
    sample_tok = None
    if d.main and cfg.sample.at_checkpoints and cfg.sample.prompts:
        from transformers import AutoTokenizer

        sample_tok = AutoTokenizer.from_pretrained(str(tok_dir))

    def flush_metrics():
        if d.main:
            store.upload_file(metrics_path, f"runs/{cfg.run.id}/metrics.jsonl")
            if sample_tok is not None:
                store.upload_file(samples_path, f"runs/{cfg.run.id}/samples.jsonl")

    def samples_now():
        """Continuations of sample.prompts from the weights of this step (rank 0; a few seconds),
        with their degeneration metrics, so a run that starts to parrot shows it while it trains."""
        from trainer.evaluate import continuation, degeneration_report
        from trainer.generate import sample

        prompts = list(cfg.sample.prompts)
        model.eval()
        # fork_rng: sampling seeds its own generator; training's RNG streams (saved in checkpoints) stay untouched.
        with torch.random.fork_rng(devices=[d.device] if d.device.type == "cuda" else []), autocast:
            texts = [continuation(p, g) for p, g in zip(prompts, sample(model, sample_tok, prompts, cfg.sample))]
        model.train()
        rep = degeneration_report(prompts, texts)
        with open(samples_path, "a") as f:
            for p, text in zip(prompts, texts):
                f.write(json.dumps({"step": step, "prompt": p, "text": text, "distinct_2": round(rep["distinct_2"], 4),
                                    "repeated_4gram_fraction": round(rep["repeated_4gram_fraction"], 4)},
                                   ensure_ascii=False) + "\n")

    def checkpoint_now(background: bool, stopping: bool = False):
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
                     "world_size": d.world, "data_position": (step + data_offset) * samples_per_step,
                     "data_offset": data_offset, "loss_ema": loss_ema, "spikes": spikes_total,
                     "rollbacks": rollbacks_total, "wall_seconds": wall_before + time.time() - t_start}
            local = run_local / "staged" / ckpt.step_name(step)
            save_checkpoint(local, model, optimizer, state, cfg, rngs)
            if sample_tok is not None and not stopping:
                samples_now()
            flush_metrics()
            uploader.submit(local, step, background=background,
                            on_done=lambda s: _drop_staged(run_local / "staged", published=ckpt.step_name(s)))
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
    rollbacks_in_a_row = 0
    while step < t.max_steps:
        if d.world > 1 or stop.requested_at is not None:  # ranks agree every step (CPU gloo, no GPU sync)
            if stop.agreed(d):
                since = stop.requested_at or time.time()
                loader.close()
                if step > last_ckpt_step:
                    checkpoint_now(background=False, stopping=True)
                uploader.wait()
                flush_metrics()
                if d.world > 1:
                    dist.barrier(group=d.control)  # every node knows the checkpoint is published
                took = time.time() - since
                log(f"rank {d.rank}: stopped at step {step} after a signal ({took:.1f}s to publish, "
                    f"train.grace_seconds={t.grace_seconds}); exiting with {EXIT_PREEMPTED}")
                if took > t.grace_seconds:
                    say(f"WARNING: stopping took {took:.1f}s, more than train.grace_seconds={t.grace_seconds}: "
                        f"the launcher may kill the next one before its checkpoint is published")
                if d.local_rank == 0:  # tells `run` on this node that the exit was clean (see launch.py)
                    from trainer.launch import PREEMPTED_MARKER

                    (run_local / PREEMPTED_MARKER).write_text(json.dumps({"step": step, "seconds": took}))
                raise Preempted()
        lr = lr_at(step, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=d.device)
        for k in range(accum):
            x, y = loader.next()
            sync = k == accum - 1 or d.world == 1
            with (ddp.no_sync() if not sync else nullcontext()):
                with autocast:
                    loss = train_model(x, y)
                (loss / accum).backward()
            step_loss += loss.detach() / accum
        norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"), foreach=True)
        found_inf = (~torch.isfinite(norm)).float()
        optimizer.found_inf, optimizer.grad_scale = found_inf, None  # fused AdamW skips the update on device
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        skipped += found_inf
        loss_sum += torch.where(found_inf > 0, torch.zeros_like(step_loss), step_loss)  # skipped steps' loss left out
        step += 1
        tokens_seen += tokens_per_step

        # Non-finite steps and loss spikes are judged here, at log steps and before every checkpoint
        # (the only host syncs), so a checkpoint never holds weights from a window that failed them.
        if step % t.log_every_steps == 0 or step % t.checkpoint_every_steps == 0 or step == t.max_steps:
            stats = torch.stack([loss_sum, skipped, norm.float()])
            if d.world > 1:
                dist.all_reduce(stats)
                stats /= d.world  # every rank holds the same skipped count (its gradients are all-reduced)
            loss_v, skipped_v, norm_v = stats.tolist()  # the sync point
            n_steps = step - steps_at_log
            n_skipped = round(skipped_v)
            skipped_total += n_skipped
            mean_loss = loss_v / max(1, n_steps - n_skipped)
            spike = bool(t.spike_factor) and loss_ema is not None and mean_loss > t.spike_factor * loss_ema
            spikes_total += spike
            trouble = (f"{n_skipped} step(s) with a non-finite loss or gradient" if n_skipped else
                       f"a loss spike ({mean_loss:.4g} > train.spike_factor={t.spike_factor} x running mean "
                       f"{loss_ema:.4g})" if spike else "")
            if trouble and t.on_nonfinite == "fail":
                raise FloatingPointError(f"{trouble} before step {step} (train.on_nonfinite=fail)")
            if not spike and n_steps > n_skipped:  # running mean of logged losses (EMA), spikes left out
                loss_ema = mean_loss if loss_ema is None else 0.9 * loss_ema + 0.1 * mean_loss
            now = time.time()
            tok_s = n_steps * tokens_per_step / (now - t_log)
            rolling_back = bool(trouble) and t.on_nonfinite == "rollback"
            row = {"step": step, "loss": round(mean_loss, 6), "lr": lr, "grad_norm": round(norm_v, 4),
                   "tok_per_s": round(tok_s, 1), "tokens": tokens_seen, "skipped_steps": skipped_total,
                   "spikes": spikes_total, "rollbacks": rollbacks_total + rolling_back,
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
            if rolling_back:
                # PaLM (Chowdhery et al. 2022, sec. 5.1): restart from the last checkpoint and skip the
                # batches around the spike. Here: the data of the failed window, via data_offset.
                loader.close()
                uploader.wait()
                bad_step, state = step, restore()
                if state is None or rollbacks_in_a_row == MAX_ROLLBACKS_IN_A_ROW:
                    raise FloatingPointError(f"{trouble} before step {step}, and " + (
                        "no checkpoint to roll back to yet" if state is None else
                        f"{MAX_ROLLBACKS_IN_A_ROW} rollbacks without reaching a new checkpoint") +
                        " (train.on_nonfinite=rollback)")
                rollbacks_in_a_row += 1
                rollbacks_total += 1
                data_offset += bad_step - state["step"]
                step, tokens_seen, loss_ema = state["step"], state["tokens_seen"], state.get("loss_ema")
                last_ckpt_step = steps_at_log = step
                loader = BatchLoader(train_samples, t.seed, samples_per_step, d.rank, d.world, micro, d.device,
                                     step + data_offset, t.max_steps + data_offset)
                wait_at_log = 0.0
                say(f"rolled back from step {bad_step} to {ckpt.step_name(step)} after {trouble}; the data of "
                    f"steps {step}-{bad_step} is skipped (data_offset={data_offset})")
                continue
        if step % t.checkpoint_every_steps == 0 or step == t.max_steps:
            checkpoint_now(background=cfg.checkpoint.upload_async and step < t.max_steps)
            rollbacks_in_a_row = 0

    loader.close()
    uploader.wait()
    flush_metrics()
    if d.world > 1:
        dist.barrier()
    return {"step": step, "tokens_seen": tokens_seen, "skipped_steps": skipped_total, "spikes": spikes_total,
            "rollbacks": rollbacks_total, "run_url": store.url(f"runs/{cfg.run.id}")}


def _drop_staged(staged_root: Path, published: str):
    """Staged local copies of checkpoints older than the one just published are not needed. Newer
    ones are kept: the next checkpoint is staged while this one uploads in the background."""
    import shutil

    for p in staged_root.iterdir() if staged_root.is_dir() else []:
        if p.name < published:  # step-NNNNNNNN names sort by step
            shutil.rmtree(p, ignore_errors=True)
