"""SFT records in the common styles (issue 23): smoltalk/OpenAI messages with content parts, ShareGPT
(from/value, human/gpt/system) are read as the same conversation; tool calls and image parts are
named as what they are, not as "empty content" or "no role"."""

import json

import pytest

from trainer.data.conversations import conversation_problem, normalize_turns

PLAIN = [{"role": "system", "content": "你是詩人"}, {"role": "user", "content": "床前明月光"},
         {"role": "assistant", "content": "疑是地上霜"}]


@pytest.mark.parametrize("messages", [
    [{"role": t["role"], "content": [{"type": "text", "text": t["content"]}]} for t in PLAIN],
    [{"role": "system", "content": "你是詩人"},
     {"role": "user", "content": [{"type": "text", "text": "床前"}, {"type": "text", "text": "明月光"}]},
     {"role": "assistant", "content": "疑是地上霜"}],
    [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]}
     for t in PLAIN],
])
def test_common_styles_read_as_the_same_conversation(messages):
    turns, problem = normalize_turns(messages)
    assert problem is None and turns == PLAIN and conversation_problem(turns) is None


@pytest.mark.parametrize("messages, reason, detail", [
    ([{"role": "user", "content": "幾點了"},
      {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "now"}}]},
      {"role": "tool", "content": "12:00"}, {"role": "assistant", "content": "十二點"}],
     "tool calls", "turn 2 (assistant) is an OpenAI tool call"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
      {"role": "assistant", "content": "貓"}], "unsupported content part", "type ['image_url']"),
    ([{"from": "bot", "value": "a"}], "unknown role", "turn 1 has role 'bot'"),
])
def test_other_styles_are_named(messages, reason, detail):
    turns, problem = normalize_turns(messages)
    problem = problem or conversation_problem(turns)
    assert problem[0] == reason and detail in problem[1], problem


def test_sharegpt_file_trains(tmp_path):
    from trainer.config import load_config
    from trainer.data.conversations import ConversationReader
    from trainer.data.sources import local_files

    path = tmp_path / "sharegpt.jsonl"
    records = [{"conversations": [{"from": "human", "value": "床前明月光"}, {"from": "gpt", "value": "疑是地上霜"}]},
               {"messages": [{"role": "user", "content": [{"type": "text", "text": "春眠"}]},
                             {"role": "assistant", "content": "不覺曉"}]}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    cfg = load_config(None, {"storage.local_dir": str(tmp_path / "w"), "data.on_error": "fail"})
    reader = ConversationReader(cfg)
    got = [turns for f in local_files([str(path)]) for _, turns in reader.iter_file(f)]
    assert [t[0]["content"] for t in got] == ["床前明月光", "春眠"] and not reader.skipped


def test_parquet_without_the_column_names_the_field_key(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainer.config import load_config
    from trainer.data.readers import DocumentReader
    from trainer.data.sources import DataError, local_files

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"content": ["床前明月光"]}), path)
    cfg = load_config(None, {"storage.local_dir": str(tmp_path / "w")})
    with pytest.raises(DataError, match=r"no column 'text' .*\(set data.text_field to the column") as e:
        list(DocumentReader(cfg.data).iter_file(local_files([str(path)])[0]))
    assert "on_error" not in str(e.value)


def test_eval_text_whitespace_only_names_the_file(tmp_path):
    from trainer.config import load_config
    from trainer.data.sources import DataError
    from trainer.evaluation.evaluate import evaluate_checkpoint

    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n \t\n", encoding="utf-8")
    cfg = load_config(None, {"storage.local_dir": str(tmp_path / "w")})
    with pytest.raises(DataError, match=r"^eval --text .*blank.txt: no text to evaluate on"):
        evaluate_checkpoint(str(tmp_path / "no-model"), cfg, [str(blank)])
