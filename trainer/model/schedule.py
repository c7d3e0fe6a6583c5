"""Learning-rate schedules as pure functions of the step (no optimizer-attached scheduler state,
so resuming needs nothing but the step number)."""

from __future__ import annotations

import math

from trainer.config import TrainConfig

# DeepSeek LLM (arXiv 2401.02954, section 2.3): full lr until 80% of training tokens, then
# 31.6% of it until 90%, then 10% (0.316^2) to the end.
MULTISTEP_POINTS = (0.8, 0.9)
MULTISTEP_FACTOR = 0.316


def lr_at(step: int, cfg: TrainConfig, max_steps: int | None = None) -> float:
    """Learning rate for the update made at `step` (0-based), for cfg.schedule, over a run of
    max_steps steps (default cfg.max_steps; the loop passes the count it derived: a budget's, an
    epoch cap's), so no derived count is written back into the config.

    All three warm up linearly over warmup_steps (from lr/warmup to lr, so step 0 is not wasted).
    cosine: half-cosine from lr to lr*min_lr_ratio at max_steps.
    wsd: warmup, stable at lr, then linear decay to lr*min_lr_ratio over the last decay_fraction
         of the steps (Hu et al., MiniCPM, arXiv 2404.06395).
    multistep: DeepSeek LLM's steps (MULTISTEP_POINTS, MULTISTEP_FACTOR); min_lr_ratio unused.
    """
    peak, total, warm = cfg.lr, max_steps or cfg.max_steps, cfg.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm
    floor = peak * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total))
        decay_start = total - decay_steps
        if step < decay_start:
            return peak
        progress = (step - decay_start) / decay_steps
        return peak + (floor - peak) * min(1.0, progress)
    if cfg.schedule == "multistep":
        frac = step / total
        factor = 1.0
        for point in MULTISTEP_POINTS:
            if frac >= point:
                factor *= MULTISTEP_FACTOR
        return peak * factor
    raise ValueError(f"train.schedule: unknown schedule {cfg.schedule!r}")
