"""Judging a model: bits per character on held-out text, and degeneration metrics of its samples.

Bits per character (BPC) divides the summed NLL by the number of characters instead of tokens, so
models with different tokenizers compare (Graves 2013, arXiv 1308.0850, uses it for the same reason).
Degeneration metrics run over characters, since Chinese has no spaces to split words on:
  * distinct-n (Li et al. 2016, arXiv 1510.03055): unique n-grams / all n-grams over all samples;
  * repeated n-gram fraction: the share of a text's n-grams already seen earlier in it, which is
    Welleck et al.'s seq-rep-n (2019, arXiv 1908.04319), averaged over samples;
  * prompt repetition: how often the prompt is copied into its own continuation (the failure in
    this project's notes: a model that "only repeated its first output").
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Sequence

from trainer.log import logger

PROGRESS_SECONDS = 10.0  # evaluation logs how far it is at most this often (issue 25: no long silence)


def char_ngrams(text: str, n: int) -> list[str]:
    """Overlapping character n-grams of text, in order."""
    if n < 1:
        raise ValueError(f"n must be at least 1 (got {n})")
    return [text[i:i + n] for i in range(len(text) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique character n-grams / all character n-grams, pooled over texts (0.0 when there are none).

    Pooled values fall as the total length grows, so compare sets of similar size and length.
    """
    if isinstance(texts, str):
        raise TypeError("distinct_n takes a list of texts, not one string")
    grams = [g for t in texts for g in char_ngrams(t, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_fraction(text: str, n: int = 4) -> float:
    """Fraction of the text's character n-grams that already occurred earlier in the same text.

    Equal to 1 - unique/total (Welleck et al.'s seq-rep-n); 0.0 for text shorter than n.
    """
    grams = char_ngrams(text, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def prompt_repetition(prompt: str, continuation: str) -> int:
    """Non-overlapping copies of the (stripped) prompt inside the continuation; 0 for an empty prompt.

    Pass the generated text only, without the prompt itself in front.
    """
    prompt = prompt.strip()
    return continuation.count(prompt) if prompt else 0


def bits_per_character(total_nll_nats: float, n_characters: int) -> float:
    """Summed negative log-likelihood (nats) / ln 2 / characters."""
    if n_characters <= 0:
        raise ValueError(f"n_characters must be positive (got {n_characters})")
    return total_nll_nats / math.log(2) / n_characters


def val_chars_per_token(index: dict) -> float:
    """Characters per token of the validation split, from a data folder's index.json, counting the
    texts' characters only. prepare counts one more per document (its <eos>, like a newline); that
    one is left out so that training's val_bpc and evaluate_bpc's bits_per_char mean the same thing."""
    chars = index["chars"].get("val", 0) - index.get("documents", {}).get("val", 0)
    return max(0, chars) / max(1, index["tokens"].get("val", 0))


def degeneration_report(prompts: Sequence[str] | None, continuations: Sequence[str]) -> dict:
    """Degeneration metrics of generated continuations (or of human text, with prompts=None, as a reference).

    distinct_1/2: pooled over continuations; repeated_4gram_fraction: mean over continuations;
    prompt_repetition_mean: mean copies of the prompt per continuation; prompt_repeated_fraction:
    share of continuations that contain their prompt at least once.
    """
    continuations = list(continuations)
    if prompts is not None and len(prompts) != len(continuations):
        raise ValueError(f"prompts ({len(prompts)}) and continuations ({len(continuations)}) differ in length")
    n = len(continuations)
    report = {
        "samples": n,
        "mean_chars": sum(map(len, continuations)) / n if n else 0.0,
        "distinct_1": distinct_n(continuations, 1),
        "distinct_2": distinct_n(continuations, 2),
        "repeated_4gram_fraction": sum(repeated_ngram_fraction(c, 4) for c in continuations) / n if n else 0.0,
    }
    if prompts is not None:
        copies = [prompt_repetition(p, c) for p, c in zip(prompts, continuations)]
        report["prompt_repetition_mean"] = sum(copies) / n if n else 0.0
        report["prompt_repeated_fraction"] = sum(c > 0 for c in copies) / n if n else 0.0
    return report


def pack_windows(ids: Sequence[int], seq_len: int) -> list[list[int]]:
    """Cut a token stream into windows of up to seq_len + 1 tokens overlapping by one, so that
    every token after the first is predicted exactly once (inputs w[:-1], targets w[1:])."""
    return [list(ids[s:s + seq_len + 1]) for s in range(0, max(0, len(ids) - 1), seq_len)]


def evaluate_bpc(model, tokenizer, texts: Sequence[str], seq_len: int, device, batch_size: int = 8) -> dict:
    """Validation loss per token and bits per character of `model` on `texts`.

    The stream is <eos> text_1 <eos> text_2 <eos> ... as in training, where every document ends
    with <eos>; the leading <eos> makes the first token of text_1 predicted too. So each text costs
    its tokens plus its closing <eos>, and `chars` counts the texts' characters (code points).
    Windows of seq_len start with fresh context (as training samples do); NLL is summed in float64.
    Returns val_loss (nats per token), bits_per_char, tokens (predicted), chars, nll_nats.
    """
    import torch
    import torch.nn.functional as F

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; evaluation separates texts with it")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("texts must hold at least one non-empty text")
    # verbose=False: documents longer than the context are expected here (pack_windows cuts them).
    # split_special_tokens: a marker spelled in the text is text, as pretraining encodes it (shards).
    encoded = tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    stream = [eos]
    for ids in encoded:
        stream += list(ids) + [eos]
    chars = sum(len(t) for t in texts)
    windows = pack_windows(stream, seq_len)

    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    predicted, start, last = 0, time.monotonic(), time.monotonic()
    try:
        with torch.no_grad():
            for b in range(0, len(windows), batch_size):
                if time.monotonic() - last >= PROGRESS_SECONDS:
                    last = time.monotonic()
                    logger.info(f"eval: bits/char: {b:,}/{len(windows):,} windows of {seq_len} tokens "
                                f"({last - start:.0f}s)")
                chunk = windows[b:b + batch_size]
                width = max(len(w) for w in chunk)
                # Short (last) windows are padded at the end; padding sits after every real token, so
                # causal attention keeps it out of their logits, and its targets are masked with -100.
                batch = torch.full((len(chunk), width), eos, dtype=torch.long)
                targets = torch.full((len(chunk), width - 1), -100, dtype=torch.long)
                for i, w in enumerate(chunk):
                    batch[i, :len(w)] = torch.tensor(w)
                    targets[i, :len(w) - 1] = torch.tensor(w[1:])
                batch, targets = batch.to(device), targets.to(device)
                logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
                per_token = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                            reduction="none")
                nll += per_token.double().sum()
                predicted += int((targets != -100).sum())
    finally:
        model.train(was_training)
    total = float(nll)
    return {
        "val_loss": total / predicted,
        "bits_per_char": bits_per_character(total, chars),
        "tokens": predicted,
        "chars": chars,
        "nll_nats": total,
    }


# Evaluating a model folder: `entrypoint.py eval` and the run report -------------------------------

def heldout_documents(cfg, files, max_chars: int, min_docs: int = 0) -> list[str]:
    """Held-out documents of the corpus (the validation split, chosen by document hash exactly as
    prepare chooses it), in corpus order, until they hold max_chars characters and number at least
    min_docs. Reads only as far into the corpus as that needs."""
    from trainer.data.readers import DocumentReader, iter_documents
    from trainer.data.shards import Normalizer, is_validation

    if cfg.data.val_permille == 0:
        return []
    norm = Normalizer(cfg.data)  # dedup as prepare does it, so a repeated document counts once
    docs, chars = [], 0
    for text in norm(iter_documents(cfg.data, files, DocumentReader(cfg.data))):
        if not is_validation(text, cfg.data.val_permille):
            continue
        docs.append(text)
        chars += len(text)
        if chars >= max_chars and len(docs) >= min_docs:
            break
    return docs


def continuation(prompt: str, generated: str) -> str:
    """The generated text after the prompt (generate.sample returns both)."""
    return generated[len(prompt):] if generated.startswith(prompt) else generated


def compare_with_human(model, tok, docs: Sequence[str], s, decoding: str = "sample") -> dict:
    """Continue held-out documents from their first s.prompt_chars characters and score the model's
    continuations and the human ones, each human continuation cut to the length of the model's,
    so that distinct-n (which falls as texts grow) compares like with like.

    decoding: "sample" (sample.* settings, generate.sample), "default" (the model's own
    generation_config, as a user of the export gets) or "greedy" (generate.continue_texts).
    Returns {"model": degeneration_report, "human": degeneration_report, "examples": up to 8 dicts}.
    """
    docs = [d for d in docs if len(d) >= s.prompt_chars + 16][:s.heldout_prompts]
    prompts = [d[:s.prompt_chars] for d in docs]
    names = [f"held-out document {i + 1}'s first sample.prompt_chars={s.prompt_chars} characters"
             for i in range(len(prompts))]
    model_cont = generate_continuations(model, tok, prompts, s, decoding, seed=1, names=names)
    human_cont = [d[s.prompt_chars:s.prompt_chars + max(1, len(c))] for d, c in zip(docs, model_cont)]
    return {"model": degeneration_report(prompts, model_cont), "human": degeneration_report(None, human_cont),
            "examples": [{"prompt": p, "text": c, "human": h} for p, c, h in zip(prompts, model_cont, human_cont)][:8]}


DECODINGS = ("default", "greedy")  # beside sample.*: what evaluate_model reports degeneration for


def generate_continuations(model, tok, prompts: Sequence[str], s, decoding: str, seed: int = 0,
                           names=None) -> list[str]:
    """The model's continuation of each prompt (prompt left out), s.max_new_tokens tokens at most,
    by `decoding` ("sample", "default" or "greedy"; see compare_with_human). names: what each
    prompt is called in an error (default sample.prompts[i]; generate.new_token_budget)."""
    from trainer.evaluation.generate import continue_texts, sample

    if decoding == "sample":
        generated = sample(model, tok, list(prompts), s, seed=seed, names=names)
        return [continuation(p, g) for p, g in zip(prompts, generated)]
    return continue_texts(model, tok, list(prompts), decoding, s.max_new_tokens, seed=seed, names=names)


def decoding_report(model, tok, s, heldout: Sequence[str], decoding: str) -> dict:
    """Degeneration under one decoding: the generation settings it used, continuations of
    s.prompts ("samples") and their metrics ("prompts"), and, when there is held-out text and
    s.heldout_prompts, continuations of held-out documents ("model") beside the human text
    cut to the same lengths ("human"), as compare_with_human computes them."""
    from trainer.evaluation.generate import generation_settings

    prompts = list(s.prompts)
    settings = generation_settings(model) if decoding == "default" else {"do_sample": False, "repetition_penalty": 1.0}
    texts = generate_continuations(model, tok, prompts, s, decoding)
    report: dict = {"settings": settings, "samples": [{"prompt": p, "text": t} for p, t in zip(prompts, texts)]}
    if prompts:
        report["prompts"] = degeneration_report(prompts, texts)
    if heldout and s.heldout_prompts:
        vs = compare_with_human(model, tok, heldout, s, decoding)
        report["model"], report["human"] = vs["model"], vs["human"]
    return report


def evaluate_model(model, tok, cfg, heldout: Sequence[str], extra: dict[str, Sequence[str]] | None = None) -> dict:
    """Bits per character on held-out text (and on each extra named text set), samples from
    cfg.sample.prompts, and degeneration metrics against the human held-out text: for sample.*
    ("samples", "prompts_degeneration", "vs_human") and, under "decoding", for the model's own
    default generation (its generation_config) and for greedy decoding (decoding_report's dicts),
    so a model that repeats itself under the defaults a user gets shows in every evaluation."""
    from trainer.evaluation.generate import sample

    s, seq_len = cfg.sample, model.config.max_position_embeddings
    result: dict = {}
    start = time.monotonic()
    if heldout and s.eval_chars:
        scored, chars = [], 0
        for text in heldout:
            if chars >= s.eval_chars:
                break
            scored.append(text)
            chars += len(text)
        logger.info(f"eval: bits per character on {len(scored):,} held-out documents ({chars:,} characters)")
        result["heldout"] = evaluate_bpc(model, tok, scored, seq_len, model.device)
        logger.info(f"eval: held-out bits/char {result['heldout']['bits_per_char']:.3f} "
                    f"({time.monotonic() - start:.0f}s)")
    for name, texts in (extra or {}).items():
        result[name] = evaluate_bpc(model, tok, texts, seq_len, model.device)
        logger.info(f"eval: {name}: bits/char {result[name]['bits_per_char']:.3f} ({time.monotonic() - start:.0f}s)")
    prompts = list(s.prompts)
    logger.info(f"eval: sampling {len(prompts)} sample.prompts and {s.heldout_prompts if heldout else 0} "
                f"held-out continuations under sample.*, the export's defaults and greedy decoding")
    generated = sample(model, tok, prompts, s)
    result["samples"] = [{"prompt": p, "text": continuation(p, g)} for p, g in zip(prompts, generated)]
    if result["samples"]:
        result["prompts_degeneration"] = degeneration_report(prompts, [x["text"] for x in result["samples"]])
    if heldout and s.heldout_prompts:
        result["vs_human"] = compare_with_human(model, tok, heldout, s)
    if prompts or (heldout and s.heldout_prompts):
        result["decoding"] = {}
        for d in DECODINGS:
            result["decoding"][d] = decoding_report(model, tok, s, heldout, d)
            logger.info(f"eval: {d} decoding done ({time.monotonic() - start:.0f}s)")
    return result


def evaluate_checkpoint(url: str, cfg, text_files: Sequence[str] = ()) -> dict:
    """`entrypoint.py eval`: load an export or checkpoint (local or s3://) and evaluate it on the
    held-out split of cfg.data.sources and on text_files (any corpus format data.* reads)."""
    from trainer.data.readers import iter_documents
    from trainer.data.sources import DataError, PulledOnDemand, local_files, resolve_sources
    from trainer.evaluation.generate import load_for_generation
    from trainer.state.checkpoint import model_dir

    extra = {}
    for path in text_files:
        if not Path(path).is_file():
            raise DataError(f"eval --text {path}: no such file")
        try:  # the reader's own "no document" error names data.sources; this file came from --text
            texts = list(iter_documents(cfg.data, local_files([path])))
        except DataError as e:
            if not str(e).startswith("data.sources"):
                raise
            texts = []
        if not texts:
            raise DataError(f"eval --text {path}: no text to evaluate on (empty, or only whitespace or bad records)")
        extra[str(path)] = texts
    folder = model_dir(str(url), cfg.storage, Path(cfg.storage.local_dir))
    model, tok = load_for_generation(str(folder), cfg)
    s = cfg.sample
    # an S3 corpus: each object copied when first read, only as far as the held-out set needs
    heldout = heldout_documents(cfg, PulledOnDemand(cfg, resolve_sources(cfg)), s.eval_chars, s.heldout_prompts)
    return {"model": str(url), **evaluate_model(model, tok, cfg, heldout, extra)}
