"""When the corpus, not the compute, limits a plan (trainer.model.planner): how many passes over
repeated data are worth it, how few tokens per parameter still train a model, and which preset a
budget buys then. Pure functions of numbers; no torch.

A budget whose compute-optimal preset would read the corpus more than MAX_EPOCHS times puts the
compute into the model instead (Muennighoff et al. 2023): the preset the budget reads nearest
MAX_EPOCHS times, among those that MAX_EPOCHS passes still give MIN_TOKENS_PER_PARAM tokens per
parameter; a preset that the budget would take past MAX_EPOCHS stops there and leaves the rest of the
budget unspent (the run's train.max_epochs stops it anyway). A corpus too small for even the smallest
preset gets that one, at MAX_EPOCHS passes, with the reason.
"""

from __future__ import annotations

import math

# Muennighoff et al. 2023, "Scaling Data-Constrained Language Models" (arXiv 2305.16264): up to
# about 4 epochs of repeated data are nearly as good as fresh data; beyond that returns fall fast.
MAX_GOOD_EPOCHS = 4.0
# What repeated data trains best with, measured on the poetry reference run (one H200, 2026-11-30,
# docs/reference-run/README.md: ~5 epochs, 4.92 held-out bits/char against 5.16 for AdamW with
# weight decay 0.1): Muon with weight decay 1.6, and no more than MAX_EPOCHS passes.
REPEATED_DATA_TRAIN = {"optimizer": "muon", "weight_decay": 1.6}
MAX_EPOCHS = 5.0
# The fewest training tokens per parameter (all of them, embeddings included) a data-limited plan
# gives its model; a judgement between the reference corpus's runs (19.6M tokens, one H200,
# docs/reference-run/README.md): 124m at 0.73 (5 passes) is the best, 4.92 held-out bits/char; the
# 271M 16 x 1024 shape at 0.24 (5.14) and 350m at 0.15 (5.72) lost. Chinchilla's optimum is 20.
MIN_TOKENS_PER_PARAM = 0.5


def data_limited_preset(tokens_of: dict[str, float], corpus_tokens: float, params: dict[str, float],
                        chosen: str) -> tuple[str, str, float]:
    """(preset, why, the most tokens it trains on) for a budget under which `chosen` (the
    compute-optimal preset) would read corpus_tokens more than MAX_EPOCHS times. tokens_of: the
    tokens the budget buys each preset; params: each preset's parameters. The preset is the one
    whose budget reads the corpus nearest MAX_EPOCHS times (log distance) among those that
    min(its tokens, MAX_EPOCHS passes) train on MIN_TOKENS_PER_PARAM tokens per parameter; the
    smallest preset when none does. Its tokens are capped at MAX_EPOCHS passes."""
    cap = MAX_EPOCHS * corpus_tokens
    trainable = [k for k in tokens_of if min(tokens_of[k], cap) >= MIN_TOKENS_PER_PARAM * params[k]]
    nearest = min(tokens_of, key=lambda k: abs(math.log(tokens_of[k] / cap)))
    why = (f"the corpus limits this plan: {chosen} (compute-optimal) would read its {corpus_tokens:.3g} tokens "
           f"{tokens_of[chosen] / corpus_tokens:.0f} times; past ~{MAX_GOOD_EPOCHS:g} passes repeated data is worth "
           "little (Muennighoff et al. 2023)")
    if not trainable:
        pick = min(params, key=params.get)
        why += (f"; {MAX_EPOCHS:g} passes give even the smallest preset, {pick}, only {cap / params[pick]:.2g} "
                f"tokens per parameter (fewer than {MIN_TOKENS_PER_PARAM:g})")
        return pick, why + _stop_note(tokens_of[pick], cap), cap
    pick = min(trainable, key=lambda k: abs(math.log(tokens_of[k] / cap)))
    if pick != nearest:
        why += (f"; {nearest} is the preset the budget reads nearest {MAX_EPOCHS:g} times, but it would train on "
                f"{min(tokens_of[nearest], cap) / params[nearest]:.2g} tokens per parameter (fewer than "
                f"{MIN_TOKENS_PER_PARAM:g}), so {pick}, the largest that trains on more")
    else:
        why += f"; {pick} is the preset the budget reads nearest {MAX_EPOCHS:g} times"
    return pick, why + _stop_note(tokens_of[pick], cap), cap


def _stop_note(budget_tokens: float, cap: float) -> str:
    """What a plan capped at `cap` tokens says of a budget that buys budget_tokens."""
    if budget_tokens <= cap:
        return ""
    return (f"; it stops at {MAX_EPOCHS:g} passes, using {100 * cap / budget_tokens:.2g}% of the budget "
            "(more text would use the rest)")
