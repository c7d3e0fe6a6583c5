"""Load an exported model (local folder or bucket URL) and sample from it."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import Config, SampleConfig
from trainer.storage import is_s3, split_url


def resolve_model_dir(url: str, cfg: Config) -> Path:
    """A local folder holding the model: the path itself, or a cached download of s3://..."""
    if not is_s3(url):
        path = Path(url).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{url}: no config.json; pass an exported model folder (runs/<id>/final)")
        return path
    store, key = split_url(url, cfg.storage)
    dest = Path(cfg.storage.local_dir) / "models" / url[len("s3://"):].replace("/", "_")
    store.download_dir(key, dest)
    if not (dest / "config.json").is_file():
        raise FileNotFoundError(f"{url}: no config.json; pass an exported model folder (runs/<id>/final)")
    return dest


def load_for_generation(url: str, cfg: Config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(url, cfg)
    device = "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def export_generation_config(s: SampleConfig, eos_ids: int | list[int] | None, pad_id: int | None):
    """The `generation_config.json` of every checkpoint and export: sample.* become the defaults of
    `model.generate()`, so that a user's plain `model.generate(**inputs)` samples as the job does.
    Without them transformers decodes greedily, and greedy decoding of a small model repeats itself
    (issue 14: 44-94% of 4-grams repeated on the demo export's default prompts).

    eos_ids: the id generation stops at, or a list of them (an SFT model's stop tokens: <|im_end|>
    and <|endoftext|>); a one-element list is stored as a plain int. pad_id: the padding token id.
    s.temperature 0 means greedy (do_sample False, no temperature/top_k/top_p written); top_k 0 and
    top_p 1 are written as they are (both mean "off" in transformers 4 and 5). Every field is set
    explicitly: transformers 5 omits from the JSON what equals its own defaults (all None), so an
    unset field would fall back to transformers 4's defaults (top_k 50, max_length 20) there.
    Returns a `transformers.GenerationConfig`; raises ValueError on an invalid combination.
    """
    from transformers import GenerationConfig

    if isinstance(eos_ids, (list, tuple)):
        eos_ids = list(eos_ids) if len(eos_ids) > 1 else (eos_ids[0] if eos_ids else None)
    greedy = s.temperature == 0
    sampling = {} if greedy else {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}
    config = GenerationConfig(do_sample=not greedy, repetition_penalty=s.repetition_penalty,
                              max_new_tokens=s.max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id, **sampling)
    config.validate(strict=True)
    return config


def portable_model_config(config: dict) -> dict:
    """config.json keys that transformers 4.x, vLLM on it and llama.cpp's converter read, beside
    the transformers 5 ones they replaced: top-level `rope_theta` (and `rope_scaling` for a
    non-default RoPE) from 5.x's `rope_parameters`, and `torch_dtype` from `dtype`. Without them
    those tools silently use RoPE base 10000 and no dtype. Loaders of 5.x read the same values
    either way. Returns a new dict; `config` is json.load of a 5.x config.json."""
    config = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if config.get("dtype") is not None:
        config.setdefault("torch_dtype", config["dtype"])
    return config


def write_portable_config(model_dir: Path) -> None:
    """Rewrite model_dir/config.json (written by save_pretrained) with portable_model_config."""
    import json

    path = Path(model_dir) / "config.json"
    config = portable_model_config(json.loads(path.read_text(encoding="utf-8")))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


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
        ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **extra)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


@torch.no_grad()
def sample(model, tok, prompts: list[str], s: SampleConfig, seed: int = 0) -> list[str]:
    """Continuations of each prompt (the prompt included), by s.temperature / top_k / top_p."""
    torch.manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids.to(model.device)
        greedy = s.temperature == 0
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=s.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else s.temperature, top_k=None if greedy or not s.top_k else s.top_k,
            top_p=None if greedy else s.top_p, repetition_penalty=s.repetition_penalty,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        out.append(tok.decode(gen[0], skip_special_tokens=True))
    return out
