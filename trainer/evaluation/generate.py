"""Load an exported model (local folder or bucket URL) and sample from it.

Context limit, one rule for generate, eval, chat and checkpoint samples (new_token_budget): a prompt
must leave room for at least one new token within the model's context (max_position_embeddings),
else it is refused naming the limit (a ConfigError: exit 2 in generate and eval; chat refuses the
message and goes on; a checkpoint's samples log it); generation stops at the context, with a warning
when that cuts sample.max_new_tokens. Nothing is truncated silently: a prompt cut from the left would
continue a text the user did not write.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import Config, ConfigError, SampleConfig
from trainer.log import logger
from trainer.state.checkpoint import model_dir


def inference_device(cfg: Config) -> tuple[str, torch.dtype]:
    """(device, dtype) that generate, eval (eval --tasks too) and chat run a model on: cuda in
    bfloat16 when there is a GPU and train.device allows it, else cpu in float32."""
    device = "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    return device, torch.bfloat16 if device == "cuda" else torch.float32


def load_for_generation(url: str, cfg: Config):
    """(model in eval mode, tokenizer) from an export or checkpoint folder, local or s3://, found by
    checkpoint.model_dir (the one resolver of generate, eval and chat); FileNotFoundError when
    there is no model there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar in generate/eval/chat output says nothing
    path = model_dir(url, cfg.storage, Path(cfg.storage.local_dir))
    device, dtype = inference_device(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def prompt_tensor(tok, prompt: str) -> torch.Tensor:
    """(1, T) ids of a prompt, its text as text: `<|im_end|>` typed in a prompt is those characters,
    not the control token (as pretraining encodes documents). The tokenizer's own BOS, if any, is added."""
    return tok(prompt, return_tensors="pt", split_special_tokens=True).input_ids


def new_token_budget(model, n_prompt: int, max_new_tokens: int, name: str) -> int:
    """Tokens to generate after a prompt of n_prompt tokens: max_new_tokens, cut to the room the
    model's context leaves (with a warning). Raises ConfigError naming `name` and the limit when the
    prompt leaves no room: transformers would generate past the context, at positions never trained."""
    context = model.config.max_position_embeddings
    if n_prompt >= context:
        raise ConfigError(f"{name}: the prompt is {n_prompt} tokens; the model's context is {context} tokens "
                          f"(max_position_embeddings), so nothing can be generated: shorten it to under "
                          f"{context} tokens")
    room = context - n_prompt
    if max_new_tokens > room:
        logger.warning(f"{name}: generating at most {room} tokens, not {max_new_tokens} (sample.max_new_tokens): "
                       f"the prompt's {n_prompt} tokens leave that much of the model's context of {context}")
    return min(max_new_tokens, room)


def _names(prompts: list[str], names) -> list[str]:
    return list(names) if names is not None else [f"sample.prompts[{i}]" for i in range(len(prompts))]


def export_sample_config(model, s: SampleConfig, keep: frozenset[str] = frozenset()) -> SampleConfig:
    """sample.* as the model's own generation_config.json has them (what the export's user gets from a
    plain `model.generate()`), with the fields named in `keep` (sample.* set on the command line)
    taken from s. `generate` without --config uses it."""
    import dataclasses

    g = model.generation_config
    values = {"temperature": (g.temperature or 1.0) if g.do_sample else 0.0, "top_k": g.top_k or 0,
              "top_p": 1.0 if g.top_p is None else g.top_p,
              "repetition_penalty": 1.0 if g.repetition_penalty is None else g.repetition_penalty,
              "max_new_tokens": g.max_new_tokens or s.max_new_tokens}
    return dataclasses.replace(s, **{k: v for k, v in values.items() if k not in keep})


GENERATION_SETTINGS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


def generation_settings(model) -> dict:
    """The sampling fields of model.generation_config (what plain `model.generate()` does)."""
    config = model.generation_config
    return {k: getattr(config, k, None) for k in GENERATION_SETTINGS}


@torch.no_grad()
def continue_texts(model, tok, prompts: list[str], decoding: str, max_new_tokens: int, seed: int = 0,
                   names=None) -> list[str]:
    """The generated continuation of each prompt (the prompt itself left out), one prompt at a time
    (no padding: the training attention, model.CAUSAL_SDPA, ignores masks).

    decoding "default": `model.generate(input_ids, attention_mask, max_new_tokens)` and nothing
    else, so model.generation_config decides, as it does for a user of the export; "greedy": the
    most likely token every step, no repetition penalty (the decoding that shows a parrot first).
    Raises ValueError for another decoding, ConfigError (naming names[i], default sample.prompts[i])
    for a prompt that fills the context (new_token_budget).
    """
    if decoding not in ("default", "greedy"):
        raise ValueError(f"decoding must be 'default' or 'greedy' (got {decoding!r})")
    extra = {} if decoding == "default" else {
        "do_sample": False, "repetition_penalty": 1.0, "temperature": None, "top_k": None, "top_p": None}
    torch.manual_seed(seed)
    out = []
    for prompt, name in zip(prompts, _names(prompts, names)):
        ids = prompt_tensor(tok, prompt).to(model.device)
        budget = new_token_budget(model, ids.shape[1], max_new_tokens, name)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, **extra)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


@torch.no_grad()
def sample(model, tok, prompts: list[str], s: SampleConfig, seed: int = 0, synced_gpus: bool = False,
           names=None) -> list[str]:
    """Continuations of each prompt (the prompt included), by s.temperature / top_k / top_p, ending at
    the model's own stop tokens (generation_config: an SFT model's <|im_end|> too) or the tokenizer's eos.
    synced_gpus: every rank generates in step (transformers' option for sharded models). Raises
    ConfigError (naming names[i], default sample.prompts[i]) for a prompt that fills the context."""
    torch.manual_seed(seed)
    eos = model.generation_config.eos_token_id
    eos = tok.eos_token_id if eos is None else eos
    out = []
    for prompt, name in zip(prompts, _names(prompts, names)):
        ids = prompt_tensor(tok, prompt).to(model.device)
        greedy = s.temperature == 0
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_token_budget(model, ids.shape[1],
                                                                                        s.max_new_tokens, name),
            do_sample=not greedy, temperature=None if greedy else s.temperature,
            top_k=None if greedy or not s.top_k else s.top_k, top_p=None if greedy else s.top_p,
            repetition_penalty=s.repetition_penalty, eos_token_id=eos, pad_token_id=tok.pad_token_id,
            synced_gpus=synced_gpus,
        )
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out
