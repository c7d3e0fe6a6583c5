"""`entrypoint.py eval --tasks` (trainer/evaluation/harness.py): lm-evaluation-harness on a tiny export,
offline, with a local task (a few Chinese multiple-choice items in cloze form, a jsonl file beside its
YAML); an unknown task name, a broken task file and a missing harness are one line each, exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import entrypoint
from trainer.data.tokenizer import EOS, PAD, save_tokenizer, train_tokenizer
from trainer.evaluation import harness
from trainer.model.hf_files import write_portable_config
from trainer.model.llama import build_model, llama_config

ROOT = Path(__file__).resolve().parent.parent
TASK = "zh_cloze_tiny"
# Cloze form: each choice is scored as the continuation of the text (what shows signal for small
# models), not as a letter after a list of options.
ITEMS = [("床前明月光，疑是地上", ["霜", "雪", "水", "山"], 0),
         ("舉頭望明月，低頭思", ["明天", "故鄉", "飯菜", "大海"], 1),
         ("春眠不覺曉，處處聞", ["汽車", "電話", "啼鳥", "大雨"], 2),
         ("白日依山盡，黃河入", ["海流", "山去", "天飛", "地走"], 0)]


@pytest.fixture
def offline(monkeypatch):
    """No network: the Hub and datasets' offline switches, in the environment and in the modules
    that read them at import (an earlier test may have imported them)."""
    import datasets.config
    import huggingface_hub.constants

    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for name in ("CONFIG", "RUN_ID", "BUCKET", "LOCAL_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory, tiny_docs) -> Path:
    """A bucket holding one run's export, runs/tiny/final: a random 2-layer model and a tokenizer
    trained on the bundled sample, written as the export stage writes them."""
    root = tmp_path_factory.mktemp("tasks") / "bucket"
    final = root / "runs" / "tiny" / "final"
    tok = train_tokenizer(tiny_docs, 512, 4)
    torch.manual_seed(0)
    config = llama_config("tiny", tok.get_vocab_size(), 64, eos_token_id=tok.token_to_id(EOS),
                          pad_token_id=tok.token_to_id(PAD))
    build_model(config, "sdpa").eval().save_pretrained(str(final))
    save_tokenizer(tok, final, 64)
    write_portable_config(final)
    return root


def write_task(folder: Path, name: str = TASK) -> Path:
    """A task YAML in the harness's format over a jsonl file beside it (datasets' json builder),
    its datasets cache inside the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in ITEMS]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                          encoding="utf-8")
    path = folder / f"{name}.yaml"
    path.write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / f"{name}.jsonl"}
  cache_dir: {folder / "hf-cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")
    return path


def eval_tasks(*args: str) -> None:
    entrypoint.main(["eval", *args])


def test_a_local_task_on_a_run_export_writes_the_run_report(bucket, tmp_path, capsys, offline):
    task = write_task(tmp_path / "tasks")
    final = bucket / "runs" / "tiny" / "final"
    eval_tasks(f"--checkpoint={final}", f"--tasks={task}", "--limit=3", "--num_fewshot=1", "--batch_size=2")
    captured = capsys.readouterr()
    assert TASK in captured.out and "acc" in captured.out  # the table
    written = bucket / "runs" / "tiny" / "report" / harness.RESULTS_FILE  # beside eval.json
    assert str(written) in captured.err
    r = json.loads(written.read_text(encoding="utf-8"))
    assert r["model"] == str(final) and r["tasks"] == [TASK]
    acc = r["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0 and acc * 3 == pytest.approx(round(acc * 3))  # a share of the 3 documents
    assert r["n-samples"][TASK] == {"original": len(ITEMS), "effective": 3}  # --limit reached the harness
    assert r["n-shot"][TASK] == 1  # and --num_fewshot
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["batch_size"] == 2
    assert r["configs"][TASK]["doc_to_choice"] == "{{choices}}"
    assert "samples" not in r and "pretty_env_info" not in r


def test_a_task_folder_and_out(bucket, tmp_path, capsys, offline):
    folder = tmp_path / "tasks"
    write_task(folder, "zh_a")
    write_task(folder, "zh_b")
    out = tmp_path / "scores.json"
    eval_tasks(f"--checkpoint={bucket / 'runs' / 'tiny' / 'final'}", f"--tasks={folder}", f"--out={out}")
    r = json.loads(out.read_text(encoding="utf-8"))
    assert sorted(r["results"]) == ["zh_a", "zh_b"]
    assert all(0.0 <= r["results"][t]["acc,none"] <= 1.0 for t in ("zh_a", "zh_b"))
    assert str(out) in capsys.readouterr().err


def one_error_line(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        eval_tasks(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_an_unknown_task_name_is_one_line_with_the_closest_names(bucket, capsys, offline):
    err = one_error_line(capsys, f"--checkpoint={bucket / 'runs' / 'tiny' / 'final'}",
                         "--tasks=xstorycloze_zh,xcopa_zz")
    assert "xcopa_zz" in err and "xcopa_zh" in err and "xstorycloze_zh (" not in err


def test_a_broken_task_file_is_named(bucket, tmp_path, capsys, offline):
    task = write_task(tmp_path / "tasks")
    task.write_text(task.read_text(encoding="utf-8").replace("doc_to_target: answer", "doc_to_target: [answer"),
                    encoding="utf-8")
    final = f"--checkpoint={bucket / 'runs' / 'tiny' / 'final'}"
    err = one_error_line(capsys, final, f"--tasks={task}")
    assert str(task) in err and "line" in err
    err = one_error_line(capsys, final, f"--tasks={task.parent}")  # in a folder, not skipped
    assert str(task) in err
    err = one_error_line(capsys, final, f"--tasks={tmp_path / 'nowhere.yaml'}")
    assert "nowhere.yaml" in err


def test_a_missing_harness_says_what_to_install(bucket, tmp_path, capsys, offline, monkeypatch):
    monkeypatch.setattr(harness, "HARNESS_MODULES", ("lm_eval", "a_module_that_is_not_installed"))
    err = one_error_line(capsys, f"--checkpoint={bucket / 'runs' / 'tiny' / 'final'}",
                         f"--tasks={write_task(tmp_path / 'tasks')}")
    assert "pip install 'zh-pretrain[eval]'" in err


def test_bad_numbers_are_refused_before_anything_runs(bucket, capsys, offline):
    final = f"--checkpoint={bucket / 'runs' / 'tiny' / 'final'}"
    assert "--limit" in one_error_line(capsys, final, "--tasks=xcopa_zh", "--limit=0")
    assert "--num_fewshot" in one_error_line(capsys, final, "--tasks=xcopa_zh", "--num_fewshot=-1")
    assert "--batch_size" in one_error_line(capsys, final, "--tasks=xcopa_zh", "--batch_size=big")
    assert "--text" in one_error_line(capsys, final, "--tasks=xcopa_zh", "--text=a.txt")


def test_results_url():
    assert harness.results_url("s3://b/p/runs/r1/final", None) == ("s3://b/p", "runs/r1/report/lm_eval.json")
    assert harness.results_url("bucket/runs/r1/checkpoints/step-00000008/", None) == (
        "bucket", "runs/r1/report/lm_eval.json")
    assert harness.results_url("runs/r1/final", None) == (".", "runs/r1/report/lm_eval.json")
    assert harness.results_url("/models/mine", None) == (None, None)
    assert harness.results_url("/models/mine", "x.json") == (None, "x.json")


def test_task_items():
    assert harness.task_items("xcopa_zh, xstorycloze_zh,") == ["xcopa_zh", "xstorycloze_zh"]
    assert harness.task_items(("xcopa_zh", "c3.yaml")) == ["xcopa_zh", "c3.yaml"]  # fire's tuple for a,b
    with pytest.raises(ValueError, match="at least one task"):
        harness.task_items(" , ")
    with pytest.raises(ValueError, match="comma-separated"):
        harness.task_items(True)  # `--tasks` with no value


def test_eval_without_tasks_imports_no_harness():
    code = ("import sys, entrypoint, trainer.evaluation.harness, trainer.job.stages\n"
            "try:\n    entrypoint.main(['eval', '--checkpoint=/no/model/here'])\n"
            "except SystemExit as e:\n    print(e.code, 'lm_eval' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], out.stderr[-2000:]


def test_report_keeps_the_task_scores(tmp_path):
    """`report` rewrites runs/<id>/report/ whole; the lm_eval.json `eval --tasks` wrote there stays,
    and report.md shows its scores."""
    from trainer.config import load_config
    from trainer.io.storage import open_storage
    from trainer.job.stages import stage_report

    cfg = load_config(None, {"run.id": "r", "storage.bucket": str(tmp_path / "bucket"),
                             "storage.local_dir": str(tmp_path / "work")}, env={})
    store = open_storage(cfg.storage.bucket)
    store.write_text("runs/r/metrics.jsonl", '{"step": 1, "loss": 5.0}\n')
    scores = json.dumps({"model": "bucket/runs/r/final", "tasks": ["xcopa_zh", "ceval_cloze"], "limit": 100,
                         "lm_eval_version": "0.4.13", "n-shot": {"xcopa_zh": 0, "ceval_cloze": 5},
                         "n-samples": {"xcopa_zh": {"original": 500, "effective": 100}},
                         "results": {"xcopa_zh": {"acc,none": 0.55, "acc_stderr,none": 0.05}},
                         "groups": {"ceval_cloze": {"acc,none": 0.3, "acc_stderr,none": 0.01, "acc_norm,none": 0.31,
                                                    "acc_norm_stderr,none": 0.012}}})
    store.write_text(f"runs/r/report/{harness.RESULTS_FILE}", scores)
    store.write_text("runs/r/report/stale.txt", "from an older report")
    key = stage_report(cfg)
    assert store.read_text(f"{key}/{harness.RESULTS_FILE}") == scores
    assert not store.exists(f"{key}/stale.txt")  # the rest was rewritten
    md = store.read_text(f"{key}/report.md")
    assert "| xcopa_zh | 0 | 100 | 0.550 ± 0.050 |  |" in md
    assert "| ceval_cloze | 5 |  | 0.300 ± 0.010 | 0.310 ± 0.012 |" in md
    assert "--limit 100: a subset" in md


# The task files shipped in trainer/evaluation/lm_eval_tasks, on stand-in datasets ----------------

SHIPPED = {  # dataset path: (its splits, one row in its fields)
    "ceval/ceval-exam": (("val", "dev"), {"id": 0, "question": "一加一等於幾？", "A": "二", "B": "三", "C": "四",
                                         "D": "五", "answer": "A", "explanation": ""}),
    "haonan-li/cmmlu": (("test", "dev"), {"Question": "一加一等於幾？", "A": "二", "B": "三", "C": "四", "D": "五",
                                         "Answer": "B"}),
    "clue/clue": (("train", "validation"), {"id": 0, "context": ["男：你好。", "女：你好啊。"],
                                            "question": "他們在做什麼？", "choice": ["打招呼", "吃飯", "睡覺"],
                                            "answer": "打招呼"}),
}


def test_the_shipped_cloze_tasks_run_by_name(bucket, tmp_path, offline, monkeypatch, capsys):
    """ceval_cloze and cmmlu_cloze are the harness's own C-Eval and CMMLU tasks with the cloze
    fields laid over them (a group's overrides); c3_cloze is a task of its own. Their datasets are
    stood in for by one row each, in the fields the Hub's have."""
    import datasets

    loaded = []

    def fake_load_dataset(path, name=None, **kwargs):
        loaded.append((path, name))
        splits, row = SHIPPED[path]
        return datasets.DatasetDict({s: datasets.Dataset.from_list([row]) for s in splits})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "shipped.json"
    eval_tasks(f"--checkpoint={bucket / 'runs' / 'tiny' / 'final'}", "--tasks=ceval_cloze,cmmlu_cloze,c3_cloze",
               "--limit=1", f"--out={out}")
    r = json.loads(out.read_text(encoding="utf-8"))
    assert {"ceval_cloze", "cmmlu_cloze"} <= set(r["groups"]) and "c3_cloze" in r["results"]
    accountant = r["configs"]["ceval-valid_accountant"]
    assert accountant["doc_to_choice"] == "{{[A, B, C, D]}}" and accountant["target_delimiter"] == ""  # cloze
    assert r["configs"]["cmmlu_agronomy"]["doc_to_text"] == "{{Question.strip()}}\n答案："
    assert ("ceval/ceval-exam", "accountant") in loaded and ("clue/clue", "c3") in loaded
    assert len([p for p, _ in loaded if p == "haonan-li/cmmlu"]) > 60  # every CMMLU subject
    for name in ("ceval_cloze", "cmmlu_cloze"):
        assert 0.0 <= r["groups"][name]["acc,none"] <= 1.0
    assert r["results"]["c3_cloze"]["acc,none"] in (0.0, 1.0)  # one document
    assert "ceval_cloze" in capsys.readouterr().out
