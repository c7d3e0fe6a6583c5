"""Evaluating a model: the pieces of trainer/evaluation/evaluate.py on a tiny random model, and `entrypoint.py
eval` / `report` after a real tiny `run` (the report stage, samples at checkpoints)."""

import json
import math

import pytest
import torch

import entrypoint
from trainer.config import load_config
from trainer.data.shards import is_validation
from trainer.data.sources import DataError, local_files
from trainer.data.tokenizer import train_tokenizer, wrap_fast
from trainer.evaluation.evaluate import (
    compare_with_human,
    continuation,
    evaluate_bpc,
    evaluate_model,
    heldout_documents,
    val_chars_per_token,
)
from trainer.io.storage import open_storage
from trainer.model.llama import CAUSAL_SDPA, build_model, llama_config

PROMPT_CHARS = 5


def cfg_with(**overrides):
    return load_config(None, overrides, env={})


# Pure helpers -----------------------------------------------------------------------------------

def test_val_chars_per_token_by_hand():
    # 1010 characters counted by prepare over 10 documents, one <eos> each counted as a character:
    # (1010 - 10) / 400 tokens = 2.5
    index = {"chars": {"train": 9999, "val": 1010}, "documents": {"train": 99, "val": 10},
             "tokens": {"train": 5000, "val": 400}}
    assert val_chars_per_token(index) == 2.5
    assert val_chars_per_token({"chars": {"val": 300}, "tokens": {"val": 100}}) == 3.0  # no document counts
    assert val_chars_per_token({"chars": {"train": 10}, "tokens": {"train": 5}}) == 0.0  # no validation split
    assert val_chars_per_token({"chars": {"val": 7}, "documents": {"val": 2}, "tokens": {}}) == 5.0  # no tokens: / 1


def test_continuation_drops_the_prompt():
    assert continuation("床前明月光", "床前明月光，疑是地上霜。") == "，疑是地上霜。"
    assert continuation("床前明月光", "床前明月光") == ""
    # a tokenizer that changed the prompt on the way back: keep everything rather than cut wrongly
    assert continuation("床前明月光", "牀前明月光，疑是") == "牀前明月光，疑是"
    assert continuation("", "abc") == "abc"


# Held-out documents -----------------------------------------------------------------------------

def synthetic_docs(n: int) -> list[str]:
    return [f"第{i}首：" + "春眠不覺曉處處聞啼鳥夜來風雨聲花落知多少"[: 5 + i % 15] for i in range(n)]


def write_jsonl(path, docs, bad_line_after: int | None = None):
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs]
    if bad_line_after is not None:
        lines.insert(bad_line_after, '{"text": "torn')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return local_files([path])


def test_heldout_documents_are_the_validation_split_in_corpus_order(tmp_path):
    docs = synthetic_docs(400)
    files = write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = cfg_with(**{"data.val_permille": 200})
    expected = [d for d in docs if is_validation(d, 200)]
    assert 40 < len(expected) < 120  # ~20% of 400, a split worth testing
    assert heldout_documents(cfg, files, max_chars=10 ** 9) == expected
    assert heldout_documents(cfg, files, max_chars=1) == expected[:1]
    assert heldout_documents(cfg, files, max_chars=1, min_docs=4) == expected[:4]
    two = len(expected[0]) + len(expected[1])
    assert heldout_documents(cfg, files, max_chars=two) == expected[:2]  # stops once max_chars is reached
    assert heldout_documents(cfg, files, max_chars=two + 1) == expected[:3]
    assert heldout_documents(cfg_with(**{"data.val_permille": 0}), files, max_chars=10 ** 9) == []


def test_heldout_documents_from_s3_copy_only_the_files_they_read(tmp_path, new_s3_bucket):
    """The report's held-out set from an S3 corpus: each object is downloaded when first read
    (PulledOnDemand), so a small set copies the first file, not the corpus; the documents are those
    of the local files. (The normaliser reads 256 documents ahead: a file holds more.)"""
    from trainer.data.sources import PulledOnDemand, pull, resolve_sources

    docs = synthetic_docs(1800)
    paths = []
    for i in range(6):
        write_jsonl(tmp_path / f"part-{i}.jsonl", docs[300 * i: 300 * (i + 1)])
        paths.append(tmp_path / f"part-{i}.jsonl")
    src = new_s3_bucket()
    for p in paths:
        src.open().upload_file(p, f"corpus/{p.name}")
    work = tmp_path / "work"
    cfg = cfg_with(**{"data.val_permille": 200, "data.sources": [f"{src.url}/corpus/"], "storage.local_dir": str(work),
                      **src.overrides()})
    files = pull(cfg, resolve_sources(cfg), stream=True)  # what stage_pull gives: objects left in the bucket
    local = local_files(paths)
    first = [d for d in docs[:300] if is_validation(d, 200)]
    few = heldout_documents(cfg, PulledOnDemand(cfg, files), max_chars=len(first[0]) + len(first[1]))
    assert few == heldout_documents(cfg, local, max_chars=len(first[0]) + len(first[1])) == first[:2]
    assert sorted(p.name for p in work.rglob("*.jsonl")) == ["part-0.jsonl"]
    every = heldout_documents(cfg, PulledOnDemand(cfg, files), max_chars=10 ** 9)
    assert every == heldout_documents(cfg, local, max_chars=10 ** 9) and len(every) > len(first)
    assert len(list(work.rglob("*.jsonl"))) == 6


def test_heldout_documents_use_the_normalised_text(tmp_path):
    """prepare splits on the hash of the text after data.* filters, so must this."""
    docs = synthetic_docs(300)
    files = write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = cfg_with(**{"data.val_permille": 300, "data.max_chars": 6, "data.min_chars": 3})
    cut = [d[:6] for d in docs]
    assert heldout_documents(cfg, files, max_chars=10 ** 9) == [d for d in cut if is_validation(d, 300)]


def test_heldout_documents_read_only_as_far_as_needed(tmp_path):
    docs = synthetic_docs(1000)
    files = write_jsonl(tmp_path / "c.jsonl", docs, bad_line_after=900)  # a torn record near the end
    cfg = cfg_with(**{"data.val_permille": 200})
    expected = [d for d in docs[:900] if is_validation(d, 200)]
    assert heldout_documents(cfg, files, max_chars=len(expected[0])) == expected[:1]  # never reached line 901
    assert heldout_documents(cfg, files, max_chars=1, min_docs=5) == expected[:5]
    with pytest.raises(DataError, match="c.jsonl:901"):  # which reading everything does
        heldout_documents(cfg, files, max_chars=10 ** 9)


# A tiny random model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny_docs):
    return wrap_fast(train_tokenizer(tiny_docs, 512, 4))


def tiny_model(tok, attn: str = "sdpa", seq_len: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    # a fresh LlamaConfig each time: build_model sets the attention on the config object it is given
    config = llama_config("tiny", len(tok), seq_len, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return build_model(config, attn).eval()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def poems(tiny_docs):
    return [d for d in tiny_docs if len(d) >= PROMPT_CHARS + 16][:6]


def eval_cfg(**overrides):
    return cfg_with(**{"sample.max_new_tokens": 6, "sample.heldout_prompts": 3, "sample.prompt_chars": PROMPT_CHARS,
                       **overrides})


def test_evaluate_model(model, tok, poems):
    short = "短詩一首"  # too short to continue from 5 characters: skipped by the comparison
    heldout = [short, *poems]
    # scores documents until eval_chars is reached: exactly the first two
    cfg = eval_cfg(**{"sample.eval_chars": len(short) + len(poems[0])})
    extra = {"other.txt": ["床前明月光，疑是地上霜。", "舉頭望明月，低頭思故鄉。"]}
    r = evaluate_model(model, tok, cfg, heldout, extra)

    expected = evaluate_bpc(model, tok, [short, poems[0]], 64, "cpu")
    assert r["heldout"]["chars"] == len(short) + len(poems[0])
    assert r["heldout"]["bits_per_char"] == pytest.approx(expected["bits_per_char"], rel=1e-6)
    assert math.isfinite(r["heldout"]["bits_per_char"]) and r["heldout"]["bits_per_char"] > 0
    assert r["other.txt"]["chars"] == 24 and r["other.txt"]["bits_per_char"] > 0

    assert [s["prompt"] for s in r["samples"]] == list(cfg.sample.prompts)
    assert r["prompts_degeneration"]["samples"] == len(cfg.sample.prompts)

    vs = r["vs_human"]
    assert vs["model"]["samples"] == vs["human"]["samples"] == 3  # sample.heldout_prompts
    assert "prompt_repetition_mean" in vs["model"] and "prompt_repetition_mean" not in vs["human"]
    assert [x["prompt"] for x in vs["examples"]] == [p[:PROMPT_CHARS] for p in poems[:3]]
    for x, doc in zip(vs["examples"], poems):
        assert x["human"] == doc[PROMPT_CHARS:PROMPT_CHARS + max(1, len(x["text"]))]  # cut to the model's length
    mean = sum(len(x["human"]) for x in vs["examples"]) / 3
    assert vs["human"]["mean_chars"] == pytest.approx(mean)
    assert vs["model"]["mean_chars"] == pytest.approx(sum(len(x["text"]) for x in vs["examples"]) / 3)


def test_evaluate_model_without_heldout(model, tok, poems):
    r = evaluate_model(model, tok, eval_cfg(**{"sample.eval_chars": 0}), poems)
    assert "heldout" not in r and "vs_human" in r
    r = evaluate_model(model, tok, eval_cfg(**{"sample.heldout_prompts": 0}), poems)
    assert "heldout" in r and "vs_human" not in r
    r = evaluate_model(model, tok, eval_cfg(), [])
    assert set(r) == {"samples", "prompts_degeneration", "decoding"}
    assert all("model" not in r["decoding"][d] and "prompts" in r["decoding"][d] for d in ("default", "greedy"))


def test_compare_with_human_cuts_human_text_to_the_model_length(model, tok, poems):
    s = eval_cfg(**{"sample.heldout_prompts": 5, "sample.max_new_tokens": 12, "sample.temperature": 0.0}).sample
    r = compare_with_human(model, tok, poems, s)
    assert len(r["examples"]) == 5
    for x, doc in zip(r["examples"], poems):
        assert x["prompt"] == doc[:PROMPT_CHARS]
        assert len(x["human"]) == min(max(1, len(x["text"])), len(doc) - PROMPT_CHARS)
        assert doc.startswith(x["prompt"] + x["human"])
    assert r == compare_with_human(model, tok, poems, s)  # greedy: the same again


def test_causal_sdpa_generates_what_sdpa_does(tok):
    """Training's sdpa_causal must decode like stock sdpa with the KV cache. It used to pass
    is_causal=True for one query against the cache, which lets it see only the first key."""
    causal = tiny_model(tok, CAUSAL_SDPA)
    plain = tiny_model(tok, "sdpa", seed=1)
    plain.load_state_dict(causal.state_dict())
    assert causal.config._attn_implementation == CAUSAL_SDPA and plain.config._attn_implementation == "sdpa"
    ids = tok("床前明月光，疑是地上霜。", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(causal(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5)  # training path
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                      use_cache=True, output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        a = causal.generate(ids, **kwargs)
        b = plain.generate(ids, **kwargs)
    assert a.sequences.shape == (1, ids.shape[1] + 24)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores):  # every decoding step's logits, not just their argmax
        assert torch.allclose(sa, sb, atol=1e-4)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")  # renamed `cache` in later 5.x
def test_causal_sdpa_refuses_chunked_prefill(tok):
    model = tiny_model(tok, CAUSAL_SDPA)
    ids = tok("床前明月光，疑是地上霜。", return_tensors="pt").input_ids
    assert ids.shape[1] > 4
    with torch.no_grad():
        past = model(input_ids=ids[:, :3], use_cache=True).past_key_values
        with pytest.raises(NotImplementedError, match="attn_implementation='sdpa'"):
            model(input_ids=ids[:, 3:], past_key_values=past, use_cache=True)


# The CLI after a real tiny run ------------------------------------------------------------------

RUN_ID = "ev"
CONFIG_ENV = ("CONFIG", "RUN_ID", "BUCKET", "LOCAL_DIR", "AWS_ENDPOINT_URL", "AWS_REGION")


@pytest.fixture
def clean_env(monkeypatch):
    """In-process CLI calls read these over the YAML file; this machine's must not leak in."""
    for name in CONFIG_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config, cli):
    """A finished tiny `run` (one process): checkpoints at steps 4 and 8, export, report."""
    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config(root, {"run.id": RUN_ID, "train.nproc": 1})
    path = cli.write_config(cfg, root / "tiny.yaml")
    result = cli.run("run", path)
    assert result.returncode == 0, result.stdout[-6000:]
    return cfg, path


def eval_cli(capsys, *args) -> dict:
    entrypoint.main(["eval", *args])
    return json.loads(capsys.readouterr().out)  # stdout holds the JSON only


@pytest.fixture(scope="module")
def final_url(trained):
    return f"{trained[0].storage.bucket}/runs/{RUN_ID}/final"


@pytest.mark.slow
def test_eval_cli_on_the_export_and_a_text_file(trained, final_url, tmp_path, capsys, clean_env):
    cfg, path = trained
    text = tmp_path / "mine.txt"
    text.write_text("床前明月光，疑是地上霜。\n\n舉頭望明月，低頭思故鄉。\n", encoding="utf-8")  # two documents
    r = eval_cli(capsys, f"--checkpoint={final_url}", f"--config={path}", f"--text={text}")
    assert r["model"] == final_url
    bpc = r["heldout"]["bits_per_char"]
    assert math.isfinite(bpc) and bpc > 0
    assert r[str(text)]["chars"] == 24 and math.isfinite(r[str(text)]["bits_per_char"])
    assert [s["prompt"] for s in r["samples"]] == list(cfg.sample.prompts)
    assert r["vs_human"]["model"]["samples"] == r["vs_human"]["human"]["samples"] > 0


@pytest.mark.slow
def test_eval_cli_missing_text_file_exits_2(trained, final_url, tmp_path, capsys, clean_env):
    missing = tmp_path / "nowhere" / "missing.txt"
    with pytest.raises(SystemExit) as e:
        entrypoint.main(["eval", f"--checkpoint={final_url}", f"--config={trained[1]}", f"--text={missing}"])
    assert e.value.code == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.slow
def test_eval_cli_on_pretraining_checkpoints(trained, final_url, capsys, clean_env):
    cfg, path = trained
    checkpoints = f"{cfg.storage.bucket}/runs/{RUN_ID}/checkpoints"
    final = eval_cli(capsys, f"--checkpoint={final_url}", f"--config={path}", "--sample.heldout_prompts=0")
    last = eval_cli(capsys, f"--checkpoint={checkpoints}/step-8", f"--config={path}", "--sample.heldout_prompts=0")
    assert "vs_human" not in final and "vs_human" not in last  # the override reached the config
    # the export holds the step-8 weights and the run's tokenizer: the same numbers
    assert last["heldout"]["bits_per_char"] == pytest.approx(final["heldout"]["bits_per_char"], rel=1e-6)
    assert last["heldout"]["tokens"] == final["heldout"]["tokens"]
    first = eval_cli(capsys, f"--checkpoint={checkpoints}/step-00000004", f"--config={path}",
                     "--sample.heldout_prompts=0")
    assert math.isfinite(first["heldout"]["bits_per_char"])
    assert first["heldout"]["bits_per_char"] != last["heldout"]["bits_per_char"]  # other weights


@pytest.mark.slow
def test_run_writes_report_and_checkpoint_samples(trained):
    cfg, _ = trained
    store = open_storage(cfg.storage.bucket)
    report = f"runs/{RUN_ID}/report"
    names = {o.key[len(report) + 1:] for o in store.list(report + "/")}
    assert {"report.md", "eval.json", "loss.png", "lr.png", "val_bpc.png"} <= names
    assert any(n.startswith("tensorboard/events.out.tfevents.") for n in names)
    for png in (n for n in names if n.endswith(".png")):
        assert store.read_bytes(f"{report}/{png}")[:8] == b"\x89PNG\r\n\x1a\n"
    ev = json.loads(store.read_text(f"{report}/eval.json"))
    assert ev["heldout"]["bits_per_char"] > 0 and "vs_human" in ev
    md = store.read_text(f"{report}/report.md")
    assert "final held-out bits/char (export)" in md and "![Loss](loss.png)" in md

    rows = [json.loads(line) for line in store.read_text(f"runs/{RUN_ID}/samples.jsonl").splitlines()]
    prompts = list(cfg.sample.prompts)
    steps = list(range(cfg.train.checkpoint_every_steps, cfg.train.max_steps + 1, cfg.train.checkpoint_every_steps))
    assert steps == [4, 8]  # a checkpoint every 4 steps of 8
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in steps for p in prompts]
    assert all(isinstance(r["text"], str) and 0 <= r["distinct_2"] <= 1 for r in rows)


@pytest.mark.slow
def test_report_cli_rewrites_the_report(trained, capsys, clean_env):
    cfg, path = trained
    store = open_storage(cfg.storage.bucket)
    report = f"runs/{RUN_ID}/report"
    before = json.loads(store.read_text(f"{report}/eval.json"))
    store.delete(f"{report}/report.md")
    store.write_text(f"{report}/stale.txt", "from an older report")
    entrypoint.main(["report", f"--config={path}"])
    captured = capsys.readouterr()
    assert store.url(report) in captured.out and store.url(f"{report}/report.md") in captured.err
    assert store.exists(f"{report}/report.md") and not store.exists(f"{report}/stale.txt")
    after = json.loads(store.read_text(f"{report}/eval.json"))
    assert after["heldout"] == pytest.approx(before["heldout"])  # the same export, scored the same way


def test_report_lists_what_the_corpus_filters_removed_and_the_skipped_records(tmp_path):
    """The report names the skipped bad records (data.on_error=skip) from the run's data index,
    found through runs/<id>/artifacts.json, also with no export yet (no evaluation then)."""
    from trainer.io.artifacts import Artifacts
    from trainer.job.stages import stage_report

    cfg = load_config(None, {"run.id": "r", "storage.bucket": str(tmp_path / "bucket"),
                             "storage.local_dir": str(tmp_path / "work")}, env={})
    store = open_storage(cfg.storage.bucket)
    store.write_text("runs/r/artifacts.json", Artifacts("tokenizers/t", "data/d").to_json())
    store.write_text("data/d/index.json", json.dumps({
        "filters": {"documents_read": 1200, "documents_kept": 1150, "removed_duplicate": 50},
        "skipped_records": {"invalid_json": 3, "missing_text_field": 2}}))
    store.write_text("runs/r/metrics.jsonl", '{"step": 1, "loss": 5.0}\n')
    key = stage_report(cfg)
    md = store.read_text(f"{key}/report.md")
    assert "| corpus documents: read / kept | 1,200 / 1,150 |" in md
    assert "| documents removed by filters | removed_duplicate: 50 |" in md
    assert "| bad records skipped | invalid_json: 3, missing_text_field: 2 |" in md
    assert "held-out bits/char" not in md  # no export: nothing evaluated


def test_evaluation_says_how_far_it_is(model, tok, poems, caplog, monkeypatch):
    """No long silence (issue 25): each phase logs when it ends, and the bits/char loop logs its
    progress (every PROGRESS_SECONDS; 0 here, so at every batch after the first)."""
    import logging

    from trainer.evaluation import evaluate

    monkeypatch.setattr(evaluate, "PROGRESS_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="trainer")
    evaluate_model(model, tok, eval_cfg(), poems)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval: ")]
    assert any(line.startswith("eval: bits per character on ") for line in lines)
    assert any(line.startswith("eval: bits/char: ") and " windows of 64 tokens" in line for line in lines)
    assert any(line.startswith("eval: held-out bits/char ") for line in lines)
    done = [line.split(" decoding")[0] for line in lines if " decoding done" in line]
    assert done == ["eval: default", "eval: greedy"]
