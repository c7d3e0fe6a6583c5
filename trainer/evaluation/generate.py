"""Load an exported model (local folder or bucket URL) and sample from it."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import Config, SampleConfig
from trainer.state.checkpoint import model_dir


def load_for_generation(url: str, cfg: Config):
    """(model in eval mode, tokenizer) from an export or checkpoint folder, local or s3://, found by
    checkpoint.model_dir (the one resolver of generate, eval and chat); FileNotFoundError when
    there is no model there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(url, cfg.storage, Path(cfg.storage.local_dir))
    device = "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def prompt_tensor(tok, prompt: str) -> torch.Tensor:
    """(1, T) ids of a prompt, its text as text: `<|im_end|>` typed in a prompt is those characters,
    not the control token (as pretraining encodes documents). The tokenizer's own BOS, if any, is added."""
    return tok(prompt, return_tensors="pt", split_special_tokens=True).input_ids


GENERATION_SETTINGS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


def generation_settings(model) -> dict:
    """The sampling fields of model.generation_config (what plain `model.generate()` does)."""
    config = model.generation_config
    return {k: getattr(config, k, None) for k in GENERATION_SETTINGS}


@torch.no_grad()
def continue_texts(model, tok, prompts: list[str], decoding: str, max_new_tokens: int, seed: int = 0) -> list[str]:
    """The generated continuation of each prompt (the prompt itself left out), one prompt at a time
    (no padding: the training attention, model.CAUSAL_SDPA, ignores masks).

    decoding "default": `model.generate(input_ids, attention_mask, max_new_tokens)` and nothing
    else, so model.generation_config decides, as it does for a user of the export; "greedy": the
    most likely token every step, no repetition penalty (the decoding that shows a parrot first).
    Raises ValueError for another decoding.
    """
    if decoding not in ("default", "greedy"):
        raise ValueError(f"decoding must be 'default' or 'greedy' (got {decoding!r})")
    extra = {} if decoding == "default" else {
        "do_sample": False, "repetition_penalty": 1.0, "temperature": None, "top_k": None, "top_p": None}
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = prompt_tensor(tok, prompt).to(model.device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **extra)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


@torch.no_grad()
def sample(model, tok, prompts: list[str], s: SampleConfig, seed: int = 0, synced_gpus: bool = False) -> list[str]:
    """Continuations of each prompt (the prompt included), by s.temperature / top_k / top_p.
    synced_gpus: every rank generates in step (transformers' option for sharded models)."""
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = prompt_tensor(tok, prompt).to(model.device)
        greedy = s.temperature == 0
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else s.temperature, top_k=None if greedy or not s.top_k else s.top_k,
            top_p=None if greedy else s.top_p, repetition_penalty=s.repetition_penalty,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, synced_gpus=synced_gpus,
        )
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out
