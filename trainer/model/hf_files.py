"""The Hugging Face files of every checkpoint and export, written so that the tools people load them
with read them alike: transformers 5 and 4.x, vLLM, llama.cpp's converter (issues 14 and 16).

  generation_config.json   sample.* as the defaults of model.generate() (export_generation_config);
  config.json              the keys transformers 4.x reads beside those 5.x renamed (write_portable_config);
  tokenizer files          tokenizer.save_tokenizer (class, context length, chat template).

llama.cpp: the converter's own table cannot name the split of a tokenizer trained here, so exports
convert through scripts/convert_to_gguf.py, for tokenizer.pre_tokenizer qwen2 (the default),
deepseek-llm or gpt-2 (docs/tokenizer.md "GGUF"; tests/test_gguf.py runs the result in llama.cpp).

No trainer imports beyond config, so checkpoint.py (which writes these files) can import it.
tests/test_export_compat.py loads each file in transformers 4.46, the newest 4.x and 5.
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.config import SampleConfig


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
    path = Path(model_dir) / "config.json"
    config = portable_model_config(json.loads(path.read_text(encoding="utf-8")))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
