"""The export's model card (README.md): what the model is, what it was trained on, for how long,
and its scores, in the Hugging Face model card format (YAML metadata block, then markdown;
https://huggingface.co/docs/hub/model-cards), so `huggingface-cli upload` of the export shows it.

Everything comes from files the run already has: the checkpoint's `config.yaml` (the resolved
config), `trainer_state.json` (LoopState), `config.json` (the model's shape), the data index
(`index.json` of the packed shards) and the metrics rows. Pure: no torch, no I/O.
"""

from __future__ import annotations

import math

from trainer.config.schema import SHAPE_KEYS, model_label


def _num(value, digits: int = 3) -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.{digits}f}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds or 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


def parameter_count(hf_config: dict) -> int:
    """Parameters of a LlamaForCausalLM from its config.json: embeddings, per layer q/k/v/o and
    SwiGLU (3 matrices) and 2 RMSNorm vectors, the final norm, lm_head unless tied
    (the layout of transformers' LlamaModel)."""
    d, v, n_layer = hf_config["hidden_size"], hf_config["vocab_size"], hf_config["num_hidden_layers"]
    heads, kv = hf_config["num_attention_heads"], hf_config.get("num_key_value_heads", hf_config["num_attention_heads"])
    head_dim = hf_config.get("head_dim") or d // heads
    attn = d * heads * head_dim * 2 + d * kv * head_dim * 2
    mlp = 3 * d * hf_config["intermediate_size"]
    per_layer = attn + mlp + 2 * d
    head = 0 if hf_config.get("tie_word_embeddings") else v * d
    return v * d + n_layer * per_layer + d + head


def last_validation(rows: list[dict]) -> dict | None:
    """The last metrics row with a validation loss: {step, val_loss, val_bpc?}, or None."""
    for row in reversed(rows):
        if isinstance(row.get("val_loss"), (int, float)):
            return {k: row[k] for k in ("step", "val_loss", "val_bpc") if k in row}
    return None


def model_card(run_id: str, config: dict, state: dict, hf_config: dict, data_index: dict | None = None,
               metrics_rows: list[dict] | None = None, stage: str = "pretrain") -> str:
    """README.md text for an export. `config`: the resolved config as a dict (config.yaml),
    `state`: trainer_state.json, `hf_config`: config.json, `data_index`: the shards' index.json
    (pretraining) or None, `metrics_rows`: metrics.jsonl rows (for the last validation scores),
    `stage`: "pretrain" or "sft". Missing pieces are left out of the card, never guessed. A run
    with model.init says what it continued from."""
    model, tok, sft = config.get("model", {}), config.get("tokenizer", {}), config.get("sft", {})
    init = model.get("init") if stage == "pretrain" else ""
    tags = ["llama", "zh-pretrain", "sft" if stage == "sft" else "continued-pretraining" if init else
            "pretrained-from-scratch"]
    meta = ["---", "language:", "- zh", "library_name: transformers", "pipeline_tag: text-generation",
            "tags:", *[f"- {t}" for t in tags], "---", ""]
    params = parameter_count(hf_config)
    what = (f"A `LlamaForCausalLM` of {params / 1e6:.1f} M parameters "
            f"({hf_config['num_hidden_layers']} layers, hidden size {hf_config['hidden_size']}, "
            f"{hf_config['num_attention_heads']} heads, {hf_config.get('num_key_value_heads')} KV heads, "
            f"context {hf_config.get('max_position_embeddings')} tokens, vocabulary {hf_config['vocab_size']:,})")
    if stage == "sft":
        what += f", fine-tuned on conversations from `{sft.get('init') or 'the pretrained export'}`."
    elif init:  # model.init: its shape and tokenizer, its weights trained further
        what += f", continued from `{init}` (its weights, shape and tokenizer), pretrained further on the data below."
    else:
        custom = {k: model[k] for k in SHAPE_KEYS if model.get(k)}  # a custom shape: the preset's numbers replaced
        what += f", pretrained from scratch (preset `{model_label(str(model.get('preset')), custom)}`)."
    md = [f"# {run_id}", "", what + " Trained by zh-pretrain; the weights are fp32, the files a stock "
          "Hugging Face folder.", "", "## Training", "", "| | |", "|---|---|"]
    rows = _training_rows(config, state, data_index, stage)
    md += [f"| {k} | {v} |" for k, v in rows] + [""]
    md += _score_lines(last_validation(metrics_rows or []))
    md += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
           "tok = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)",
           "ids = tok(\"床前明月光\", return_tensors=\"pt\")",
           "print(tok.decode(model.generate(**ids, max_new_tokens=64)[0]))", "```", "",
           "`generation_config.json` holds the sampling defaults the run used (temperature "
           f"{config.get('sample', {}).get('temperature')}, top-k {config.get('sample', {}).get('top_k')}, "
           f"top-p {config.get('sample', {}).get('top_p')}, repetition penalty "
           f"{config.get('sample', {}).get('repetition_penalty')}), so plain `generate` samples. "
           "For llama.cpp: `python scripts/convert_to_gguf.py PATH --llama-cpp <llama.cpp dir> "
           "--outfile model.gguf`, then `llama-cli -m model.gguf -p \"床前明月光\"`.", ""]
    if tok:
        md.insert(md.index("## Use"), f"Tokenizer: byte-level BPE, pre-tokenizer `{tok.get('pre_tokenizer')}`, "
                                      f"requested vocabulary {tok.get('vocab_size')}.\n")
    return "\n".join(meta + md)


def _training_rows(config: dict, state: dict, data_index: dict | None, stage: str) -> list[tuple[str, str]]:
    train, data, sft = config.get("train", {}), config.get("data", {}), config.get("sft", {})
    sources = sft.get("sources") if stage == "sft" else data.get("sources")
    rows = [("data sources", ", ".join(f"`{s}`" for s in (sources or [])) or "-")]
    weights, caps = (data.get("weights") or [], data.get("max_epochs") or []) if stage != "sft" else ([], [])
    if weights and len(weights) == len(sources or []):  # a mixture: each source's share (and cap) of the samples
        rows.append(("mixture (data.weights)", ", ".join(
            f"`{s}` {w / sum(weights):.1%}" + (f" (at most {c:g} epochs)" if c else "")
            for s, w, c in zip(sources, weights, caps or [0] * len(weights)))))
    if data_index:
        docs, chars = data_index.get("documents", {}), data_index.get("chars", {})
        train_tokens = sum(s.get("tokens", 0) for s in data_index.get("train", []))
        rows += [("documents (train / validation)", f"{_num(docs.get('train'))} / {_num(docs.get('val'))}"),
                 ("characters (train)", _num(chars.get("train"))), ("training tokens per epoch", _num(train_tokens))]
        if train_tokens:
            rows.append(("epochs", f"{state.get('tokens_seen', 0) / train_tokens:.2f}"))
    if stage == "sft":  # SFT's own batch and schedule (sft.*); the rest of the optimizer is train.*'s
        batch = f"{sft.get('batch_sequences')} conversations' packed rows per step"
        lr, warmup = sft.get("lr"), sft.get("warmup_steps")
    else:
        batch = f"{_num(train.get('batch_tokens'))} tokens, sequences of {train.get('seq_len')}"
        lr, warmup = train.get("lr"), train.get("warmup_steps")
    took = f"{_duration(state.get('wall_seconds', 0))} on {state.get('world_size', 1)} process(es)"
    rows += [("optimizer steps", _num(state.get("step"))), ("tokens seen", _num(state.get("tokens_seen"))),
             ("training time", took),
             ("global batch", batch),
             ("optimizer", f"{train.get('optimizer')}, lr {lr}, weight decay {train.get('weight_decay')}, "
                           f"{train.get('schedule')} schedule, {warmup} warm-up steps"),
             ("seed", str(train.get("seed", "-"))),
             ("steps skipped (non-finite) / rollbacks",
              f"{state.get('skipped_steps', 0)} / {state.get('rollbacks', 0)}")]
    return rows


def _score_lines(val: dict | None) -> list[str]:
    if not val:
        return []
    bpc = f", {_num(val['val_bpc'])} bits per character" if "val_bpc" in val else ""
    return ["## Scores", "", f"Validation split (documents held out by hash, never trained on) at step "
            f"{val.get('step')}: loss {_num(val['val_loss'])} nats per token{bpc}. The run's "
            "`report/eval.json` in the bucket has the export's held-out bits per character, its "
            "samples and repetition beside human text.", ""]
