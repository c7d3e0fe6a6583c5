import json

import pytest

from trainer.evaluation.report import parse_metrics, series, tensorboard_tag, write_report, write_tensorboard

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics_text() -> str:
    rows = []
    for step in range(10, 110, 10):
        rows.append({"step": step, "loss": 8.0 - step / 20, "lr": 1e-3 * step / 100, "grad_norm": 1.0 + 1 / step,
                     "tok_per_s": 50_000.0 + step, "mfu": 0.35})
        if step % 50 == 0:
            rows.append({"step": step, "val_loss": 7.5 - step / 25, "val_bpc": 9.0 - step / 20})
    # a resume from step 50 logs steps 60.. again; the later rows win
    rows.append({"step": 100, "loss": 2.5, "val_loss": 3.21094, "val_bpc": 4.4321})
    return "\n".join(json.dumps(r) for r in rows) + "\n" + '{"step": 110, "lo'  # torn last line


def test_parse_metrics_and_series():
    rows, bad = parse_metrics(_metrics_text())
    assert bad == 1 and len(rows) == 13
    steps, values = series(rows, "val_loss")
    assert steps == [50, 100]
    assert values == [pytest.approx(5.5), 3.21094]  # 7.5 - 50/25, then the resumed run's value
    assert series(rows, "missing") == ([], [])


def test_write_report(tmp_path):
    samples = [{"prompt": "床前明月光", "text": "，疑是地上霜。", "step": 100, "distinct_2": 1.0}]
    summary = {"run": "demo", "final val bits/char": 4.4321, "preset": "tiny"}
    paths = write_report(_metrics_text(), tmp_path / "out", samples=samples, summary=summary)
    names = sorted(p.name for p in paths)
    assert names == sorted(["report.md", "loss.png", "val_bpc.png", "lr.png", "grad_norm.png", "throughput.png"])
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_SIGNATURE
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| validation loss | 3.211 | 100 |" in md  # final val loss, from the resumed row
    assert "| validation bits/char | 4.432 | 100 |" in md
    assert "Best validation loss: 3.211 at step 100" in md
    assert "床前明月光，疑是地上霜。" in md and "![Loss](loss.png)" in md
    assert "| final val bits/char | 4.432 |" in md
    assert "1 unreadable lines skipped" in md


def test_write_report_plots_only_what_was_logged(tmp_path):
    text = "\n".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) for s in range(1, 4))
    paths = write_report(text, tmp_path, samples=None, summary=None)
    assert sorted(p.name for p in paths) == ["loss.png", "report.md"]
    assert "validation" not in (tmp_path / "report.md").read_text()


def test_tensorboard_tags():
    assert tensorboard_tag("val_loss") == "val/loss"
    assert tensorboard_tag("grad_norm") == "train/grad_norm"


def test_write_tensorboard_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows, _ = parse_metrics(_metrics_text())
    write_tensorboard(rows, tmp_path)
    files = write_tensorboard(rows, tmp_path)  # rewriting replaces, not duplicates
    assert len(files) == 1
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tok_per_s", "train/mfu", "val/loss",
            "val/bpc"} <= set(tags)
    val = [(e.step, e.value) for e in acc.Scalars("val/loss")]
    assert val == [(50, pytest.approx(5.5)), (100, pytest.approx(3.21094))]  # step 100's later row won
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert len(loss) == 10 and loss[-1] == (100, 2.5)
