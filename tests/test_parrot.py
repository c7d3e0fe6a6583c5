"""Never a parrot by default (issue 14): the export's generation_config.json carries sample.*, and
eval / the report show degeneration under the export's default generation and greedy decoding,
beside the human text's; report.md shows each sample once and the lr schedule from step 1."""

import json

import pytest
import torch

from trainer.config import load_config
from trainer.data.tokenizer import train_tokenizer, wrap_fast
from trainer.evaluation.evaluate import decoding_report, evaluate_model
from trainer.evaluation.generate import continue_texts, generation_settings
from trainer.evaluation.report import REPEAT_LIMIT, lr_schedule_series, report_samples, write_run_report
from trainer.model.hf_files import export_generation_config
from trainer.model.llama import build_model, llama_config

PROMPT_CHARS = 5


def cfg_with(**overrides):
    return load_config(None, overrides, env={})


@pytest.fixture(scope="module")
def tok(tiny_docs):
    return wrap_fast(train_tokenizer(tiny_docs, 512, 4))


def tiny_model(tok, seed: int = 0):
    torch.manual_seed(seed)
    config = llama_config("tiny", len(tok), 64, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return build_model(config, "sdpa").eval()


def parrot(tok, token: str = "月"):
    """A model whose every next-token distribution is flat over the tokens that are whole
    characters, but for a small lead of `token`: greedy decoding repeats that one token forever,
    sampling (temperature 0.8, top-k 50) does not. Special tokens, byte pieces of a character and
    padded rows get -1e4 (a byte piece decodes to U+FFFD, and "\ufffd" * 4 would be a repeat too).
    lm_head gets zero weights and a bias; the test never saves it."""
    model = tiny_model(tok)
    (token_id,) = tok(token, add_special_tokens=False).input_ids
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1e4)
        for i in range(len(tok)):
            text = tok.decode([i])
            if i not in tok.all_special_ids and text.strip() and "\ufffd" not in text:
                head.bias[i] = 0.0
        head.bias[token_id] = 0.5
    model.lm_head = head
    return model


# export_generation_config --------------------------------------------------------------------------

def test_export_generation_config_round_trips_through_from_pretrained(tok, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    s = cfg_with(**{"sample.temperature": 0.7, "sample.top_k": 40, "sample.top_p": 0.9,
                    "sample.repetition_penalty": 1.2, "sample.max_new_tokens": 33}).sample
    model = tiny_model(tok)
    model.generation_config = export_generation_config(s, tok.eos_token_id, tok.pad_token_id)
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert {k: saved[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                                  "max_new_tokens", "eos_token_id", "pad_token_id")} == {
        "do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.2,
        "max_new_tokens": 33, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}

    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    g = loaded.generation_config
    assert (g.do_sample, g.temperature, g.top_k, g.top_p, g.repetition_penalty, g.max_new_tokens) == (
        True, 0.7, 40, 0.9, 1.2, 33)
    assert GenerationConfig.from_pretrained(str(tmp_path)).do_sample is True

    # Plain generate() on the reloaded model samples: other seeds, other texts; greedy repeats itself
    ids = tok("床前明月光", return_tensors="pt").input_ids
    outs = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        outs.append(loaded.generate(ids, attention_mask=torch.ones_like(ids))[0].tolist())
    assert len({tuple(o) for o in outs}) == 3
    assert max(len(o) for o in outs) == ids.shape[1] + 33  # max_new_tokens came from the file
    greedy = [loaded.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False)[0].tolist() for _ in "ab"]
    assert greedy[0] == greedy[1]


def test_export_generation_config_greedy_and_stop_tokens(tok):
    s = cfg_with(**{"sample.temperature": 0.0}).sample
    g = export_generation_config(s, [7, 0], 1)  # an SFT model: <|im_end|> and <|endoftext|>
    assert g.do_sample is False and g.temperature is None and g.top_k is None and g.top_p is None
    assert g.eos_token_id == [7, 0] and g.pad_token_id == 1
    assert g.repetition_penalty == s.repetition_penalty and g.max_new_tokens == s.max_new_tokens
    assert export_generation_config(cfg_with().sample, [0], 1).eos_token_id == 0  # one stop token: an int
    assert export_generation_config(cfg_with().sample, (), None).eos_token_id is None
    off = export_generation_config(cfg_with(**{"sample.top_k": 0, "sample.top_p": 1.0}).sample, 0, 1)
    assert (off.top_k, off.top_p) == (0, 1.0)  # written as "off", not left to a version's default


def test_continue_texts_rejects_an_unknown_decoding(tok):
    with pytest.raises(ValueError, match="'beam'"):
        continue_texts(tiny_model(tok), tok, ["床前"], "beam", 4)


# Degeneration by decoding ------------------------------------------------------------------------------

def eval_cfg(**overrides):
    return cfg_with(**{"sample.max_new_tokens": 20, "sample.heldout_prompts": 3, "sample.prompt_chars": PROMPT_CHARS,
                       "sample.eval_chars": 0, **overrides})


@pytest.fixture(scope="module")
def poems(tiny_docs):
    return [d for d in tiny_docs if len(d) >= PROMPT_CHARS + 40][:6]


def test_a_parrot_shows_under_greedy_and_default_generation(tok, poems):
    cfg = eval_cfg()
    model = parrot(tok)
    # an export as they were before issue 14: generation_config holds eos/pad only, so greedy by default
    model.generation_config.do_sample = False
    r = evaluate_model(model, tok, cfg, poems)
    default, greedy = r["decoding"]["default"], r["decoding"]["greedy"]
    assert default["settings"]["do_sample"] is False
    for d in (default, greedy):
        assert d["prompts"]["repeated_4gram_fraction"] > 0.8 and d["model"]["repeated_4gram_fraction"] > 0.8
        assert d["human"]["repeated_4gram_fraction"] < 0.2  # the poems themselves do not repeat
        assert d["model"]["samples"] == d["human"]["samples"] == 3
        assert [x["prompt"] for x in d["samples"]] == list(cfg.sample.prompts)
        assert all(x["text"].startswith("月月月") for x in d["samples"])
    assert r["prompts_degeneration"]["repeated_4gram_fraction"] < 0.2  # sample.* settings hide the parrot

    # the same model exported with sample.* as its defaults no longer repeats itself by default
    model.generation_config = export_generation_config(cfg.sample, tok.eos_token_id, tok.pad_token_id)
    fixed = decoding_report(model, tok, cfg.sample, poems, "default")
    assert fixed["settings"] == {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95,
                                 "repetition_penalty": 1.1}
    assert fixed["prompts"]["repeated_4gram_fraction"] <= REPEAT_LIMIT
    assert fixed["model"]["repeated_4gram_fraction"] <= REPEAT_LIMIT
    assert not any(x["text"].startswith("月月") for x in fixed["samples"])


def test_decoding_report_without_heldout_or_prompts(tok, poems):
    model = tiny_model(tok)
    r = decoding_report(model, tok, eval_cfg().sample, [], "greedy")
    assert set(r) == {"settings", "samples", "prompts"}
    r = decoding_report(model, tok, eval_cfg(**{"sample.prompts": []}).sample, poems, "default")
    assert set(r) == {"settings", "samples", "model", "human"} and r["samples"] == []
    assert r["settings"] == generation_settings(model)
    r = evaluate_model(model, tok, eval_cfg(**{"sample.prompts": [], "sample.heldout_prompts": 0}), poems)
    assert "decoding" not in r  # nothing to continue


# The report ---------------------------------------------------------------------------------------

def degeneration(rep4: float, distinct2: float = 0.9, prompts: bool = True) -> dict:
    r = {"samples": 3, "mean_chars": 40.0, "distinct_1": 0.8, "distinct_2": distinct2, "repeated_4gram_fraction": rep4}
    if prompts:
        r.update(prompt_repetition_mean=0.0, prompt_repeated_fraction=0.0)
    return r


PROMPTS = ["床前明月光", "春眠不覺曉", "白日依山盡"]


def evaluation(default_rep4: float, export_step: int = 8) -> dict:
    def decoded(rep4, text):
        return {"settings": {"do_sample": rep4 < 0.5}, "samples": [{"prompt": p, "text": text} for p in PROMPTS],
                "prompts": degeneration(rep4), "model": degeneration(rep4), "human": degeneration(0.0, prompts=False)}

    return {"export_step": export_step, "heldout": {"bits_per_char": 5.5},
            "samples": [{"prompt": p, "text": f"，樣本{i}。"} for i, p in enumerate(PROMPTS)],
            "prompts_degeneration": degeneration(0.01),
            "vs_human": {"model": degeneration(0.01), "human": degeneration(0.0, prompts=False),
                         "examples": [{"prompt": "秋風", "text": "起兮", "human": "白雲飛"},
                                      {"prompt": "秋風\n夜", "text": "月", "human": "雨"}]},
            "decoding": {"default": decoded(default_rep4, "月月月月月月" if default_rep4 > 0.5 else "，樣本0。"),
                         "greedy": decoded(0.9, "月月月月月月")}}


def checkpoint_rows(steps) -> str:
    return "".join(json.dumps({"step": s, "prompt": p, "text": f"，第{s}步。", "distinct_2": 0.5}) + "\n"
                   for s in steps for p in PROMPTS)


METRICS = "".join(json.dumps({"step": s, "loss": 5.0, "lr": 1e-3}) + "\n" for s in (20, 40))


def test_report_shows_the_parrot_and_each_sample_once(tmp_path):
    write_run_report(tmp_path, METRICS, {"run": "r"}, evaluation(0.9), checkpoint_rows([4, 8]))
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Degeneration" in md and "**The export repeats itself under its default generation**: 90%" in md
    assert "| export default (generation_config) | 0.900 (0.900) | 0.900 (0.000) | 0.00 | 40.0 |" in md
    assert "| greedy | 0.900 (0.900) | 0.900 (0.000) | 0.00 | 40.0 |" in md
    assert "| human text | 0.900 | 0.000 | - | 40.0 |" in md
    assert "| export default (generation_config): distinct-2 / repeated 4-grams | 0.900 / 0.900 |" in md
    for i, p in enumerate(PROMPTS):
        assert md.count(f"{p}，樣本{i}。") == 1  # the export's sample, shown once
        # default and greedy produced the same parrot text: one sample naming both decodings
        assert md.count(f"{p}月月月月月月") == 1
        assert f"### {4 + i}. {p} [export default (generation_config) = greedy]" in md
        assert f"{p}，第8步。" not in md  # the step-8 checkpoint is the export: not again (issue 16)
    assert "秋風起兮" in md and "秋風白雲飛" in md
    assert "### 8. 秋風 夜 [held-out prompt, sample.* settings]" in md  # one line, whatever the prompt holds
    assert "Export default generation: do_sample=False." in md


def test_report_says_when_the_export_sets_no_generation_defaults(tmp_path):
    ev = evaluation(0.9)
    ev["decoding"]["default"]["settings"] = dict.fromkeys(["do_sample", "temperature", "top_k"])
    write_run_report(tmp_path, METRICS, {"run": "r"}, ev, "")
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "nothing set in generation_config.json (transformers then decodes greedily)" in md


def test_report_without_a_parrot_has_no_warning_and_dedups_default_samples(tmp_path):
    write_run_report(tmp_path, METRICS, {"run": "r"}, evaluation(0.01), "")
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## Degeneration" in md and "The export repeats itself" not in md
    # the default generation gave the sample.* texts: each shown once, its heading naming both
    assert md.count("床前明月光，樣本0。") == 1
    assert "### 1. 床前明月光 [sample.* settings = export default (generation_config)]" in md


def test_report_samples_of_checkpoints_newer_than_the_export_or_without_one():
    rows = [json.loads(line) for line in checkpoint_rows([4, 8, 12]).splitlines()]
    newer = report_samples(evaluation(0.01, export_step=8), rows)
    assert [x["step"] for x in newer if "step" in x] == [12, 12, 12]
    alone = report_samples(None, rows)
    assert [(x["step"], x["prompt"]) for x in alone] == [(12, p) for p in PROMPTS]
    assert report_samples(None, []) == []


def test_lr_schedule_series_starts_with_warmup():
    t = cfg_with(**{"train.lr": 1e-3, "train.warmup_steps": 20, "train.max_steps": 100,
                    "train.schedule": "cosine", "train.min_lr_ratio": 0.1}).train
    steps, lrs = lr_schedule_series(t)
    assert steps[:2] == [1, 2] and steps[-1] == 100 and len(lrs) == 100
    assert lrs[0] == pytest.approx(1e-3 / 20)  # row of step 1: the first update's lr
    assert lrs[19] == pytest.approx(1e-3)  # row of step 20: the last warm-up update, at the peak
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)  # decayed to min_lr_ratio


def test_lr_plot_draws_the_schedule_under_the_logged_points(tmp_path, monkeypatch):
    import trainer.evaluation.report as report

    drawn = {}
    monkeypatch.setattr(report, "_plot", lambda path, title, ylabel, lines, log_y: drawn.setdefault(path.name, lines))
    t = cfg_with(**{"train.lr": 1e-3, "train.warmup_steps": 20, "train.max_steps": 40}).train
    write_run_report(tmp_path, METRICS, {"run": "r"}, None, "", train_cfg=t)
    (s_steps, s_lrs, s_label), (l_steps, _, l_label) = drawn["lr.png"]
    assert (s_label, l_label) == ("schedule", "logged")
    assert s_steps[0] == 1 and s_lrs[0] == pytest.approx(5e-5) and l_steps == [20, 40]
    drawn.clear()
    write_run_report(tmp_path, METRICS, {"run": "r"}, None, "")  # no config: the logged points alone
    assert [label for *_, label in drawn["lr.png"]] == ["lr"]
