"""Run report: `report.md` with PNG plots from metrics.jsonl, and TensorBoard event files.

Rows of metrics.jsonl are dicts with `step` and any of loss, lr, grad_norm, tok_per_s, mfu,
val_loss, val_bpc (train and eval rows may be separate). A resumed run appends rows for steps it
already logged; for each metric the last row of a step wins. Plots use matplotlib's object API
(Figure + Agg canvas), so nothing touches pyplot's global backend or needs a display.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from trainer.evaluation.harness import RESULTS_FILE

# (file, title, y label, [(metric key, legend label)], log y axis)
PLOTS = [
    ("loss.png", "Loss", "loss (nats/token)", [("loss", "train"), ("val_loss", "validation")], False),
    ("val_bpc.png", "Validation bits per character", "bits/char", [("val_bpc", "validation")], False),
    ("lr.png", "Learning rate", "lr", [("lr", "lr")], False),
    ("grad_norm.png", "Gradient norm (before clipping)", "grad norm", [("grad_norm", "grad norm")], True),
    ("throughput.png", "Throughput", "tokens/s", [("tok_per_s", "tokens/s")], False),
]


def parse_metrics(text: str) -> tuple[list[dict], int]:
    """Rows of a JSON-lines text, and the number of unreadable lines skipped (a job killed while
    writing leaves a torn last line; the report should still come out)."""
    rows, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and _number(row.get("step")) is not None:
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, sorted by step, the last row of each step winning."""
    by_step = {}
    for row in rows:
        value = _number(row.get(key))
        if value is not None:
            by_step[int(row["step"])] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _plot(path: Path, title: str, ylabel: str, lines: list[tuple[list, list, str]], log_y: bool) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for steps, values, label in lines:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log_y and all(v > 0 for _, values, _ in lines for v in values):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if 1e4 <= abs(value) < 1e12 else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _cell(value) -> str:
    return _fmt(value).replace("|", "\\|").replace("\n", " ")


def lr_schedule_series(train_cfg) -> tuple[list[int], list[float]]:
    """(steps, lr) of the whole schedule of a TrainConfig, as metrics rows report it: the row of
    step k (k updates done) holds the lr of update k-1, so the curve starts at step 1 with
    warm-up's first value. Metrics rows come every log_every_steps, often the first one after
    warm-up has ended; this curve shows the warm-up the rows miss."""
    from trainer.model.schedule import lr_at

    return list(range(1, train_cfg.max_steps + 1)), [lr_at(k, train_cfg) for k in range(train_cfg.max_steps)]


def write_report(metrics_jsonl_text: str, out_dir: Path, samples: list[dict] | None = None,
                 summary: dict | None = None, lr_schedule: tuple[list[int], list[float]] | None = None,
                 sections: list[str] | None = None) -> list[Path]:
    """Write report.md and the PNG plots there is data for into out_dir; return the paths written.

    `samples`: dicts with `prompt` and `text` (generated continuation), optionally `step`,
    `decoding` (how it was generated, shown in its heading), `human` (the human continuation of
    the same prompt, shown beside it) and metric keys (shown under the sample). `summary`:
    key/value pairs for the top table (config highlights, final bits per character, degeneration
    metrics, ...). `lr_schedule`: (steps, lr) of the planned schedule (lr_schedule_series), drawn
    under the logged lr. `sections`: markdown lines put after the final metrics.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, bad = parse_metrics(metrics_jsonl_text)
    written = []

    images = []
    for name, title, ylabel, keys, log_y in PLOTS:
        lines = [(*series(rows, key), label) for key, label in keys]
        if name == "lr.png" and lr_schedule and lr_schedule[0]:
            lines = [(*lr_schedule, "schedule"), *[(*line[:2], "logged") for line in lines]]
        lines = [line for line in lines if line[0]]
        if lines:
            _plot(out_dir / name, title, ylabel, lines, log_y)
            written.append(out_dir / name)
            images.append((title, name))

    md = ["# Run report", ""]
    if summary:
        md += ["| | |", "|---|---|"] + [f"| {_cell(k)} | {_cell(v)} |" for k, v in summary.items()] + [""]

    md += ["## Final metrics", ""]
    finals = []
    for key, label in [("loss", "train loss"), ("val_loss", "validation loss"), ("val_bpc", "validation bits/char"),
                       ("lr", "lr"), ("grad_norm", "grad norm"), ("tok_per_s", "tokens/s"), ("mfu", "MFU")]:
        steps, values = series(rows, key)
        if steps:
            finals.append(f"| {label} | {_fmt(values[-1])} | {steps[-1]} |")
    if finals:
        md += ["| metric | last value | at step |", "|---|---|---|"] + finals
    else:
        md.append("No metrics logged.")
    for key, label in [("val_loss", "validation loss"), ("val_bpc", "validation bits/char")]:
        steps, values = series(rows, key)
        if steps:
            best = min(range(len(values)), key=values.__getitem__)
            md.append(f"\nBest {label}: {_fmt(values[best])} at step {steps[best]}.")
    md.append(f"\n{len(rows)} metric rows" + (f"; {bad} unreadable lines skipped." if bad else "."))
    md.append("")
    md += sections or []

    if images:
        md += ["## Plots", ""] + [line for title, name in images for line in (f"![{title}]({name})", "")]

    if samples:
        md += ["## Samples", ""]
        for i, sample in enumerate(samples, 1):
            step = f" (step {sample['step']})" if "step" in sample else ""
            how = f" [{sample['decoding']}]" if sample.get("decoding") else ""
            title = " ".join(sample.get("prompt", "").split())  # a prompt's line break would end the heading
            md.append(f"### {i}. {title}{step}{how}")
            md += ["", "```text", f"{sample.get('prompt', '')}{sample.get('text', '')}", "```"]
            if sample.get("human") is not None:  # the held-out document's own continuation, same length
                md += ["", "human continuation:", "", "```text", f"{sample.get('prompt', '')}{sample['human']}", "```"]
            extra = {k: v for k, v in sample.items() if k not in ("prompt", "text", "step", "human", "decoding")}
            if extra:
                md += ["", ", ".join(f"{k}: {_fmt(v)}" for k, v in extra.items())]
            md.append("")

    report = out_dir / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    return [report] + written


def tensorboard_tag(key: str) -> str:
    """val_loss -> val/loss, loss -> train/loss: TensorBoard groups charts by the part before '/'."""
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def write_tensorboard(metrics_rows: list[dict], log_dir: Path) -> list[Path]:
    """Write every numeric metric as a TensorBoard scalar (one value per step, the last row of a
    step winning, as in the report); return the event files.

    Event files this function wrote earlier in log_dir are replaced, so regenerating does not
    show every curve twice.
    """
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("events.out.tfevents.*.metrics"):
        old.unlink()
    rows = [r for r in metrics_rows if _number(r.get("step")) is not None]
    keys = dict.fromkeys(k for r in rows for k, v in r.items() if k != "step" and _number(v) is not None)
    writer = SummaryWriter(log_dir=str(log_dir), filename_suffix=".metrics")
    try:
        for key in keys:
            for step, value in zip(*series(rows, key)):
                writer.add_scalar(tensorboard_tag(key), value, global_step=step)
    finally:
        writer.close()
    return sorted(log_dir.glob("events.out.tfevents.*.metrics"))


# Issue 14's bar for "not a parrot": at most this share of a continuation's 4-grams repeated.
REPEAT_LIMIT = 0.05

DECODING_LABELS = {"sample": "sample.* settings", "default": "export default (generation_config)",
                   "greedy": "greedy"}


def _degeneration_row(label: str, r: dict, human: dict | None = None) -> str:
    def pair(key):
        return f"{r[key]:.3f}" + (f" ({human[key]:.3f})" if human else "")

    copies = f"{r['prompt_repeated_fraction']:.2f}" if "prompt_repeated_fraction" in r else "-"
    return f"| {label} | {pair('distinct_2')} | {pair('repeated_4gram_fraction')} | {copies} | {r['mean_chars']:.1f} |"


def degeneration_section(evaluation: dict) -> list[str]:
    """Markdown: degeneration of the export's continuations for sample.* settings, its own default
    generation and greedy decoding, beside the human text cut to the same lengths, and a warning
    when the default generation repeats more than REPEAT_LIMIT of its 4-grams (a parrot)."""
    decoding = evaluation.get("decoding", {})
    rows = []
    if "vs_human" in evaluation:
        rows.append(_degeneration_row("human text", evaluation["vs_human"]["human"]))
        rows.append(_degeneration_row(DECODING_LABELS["sample"], evaluation["vs_human"]["model"],
                                      evaluation["vs_human"]["human"]))
    rows += [_degeneration_row(DECODING_LABELS[d], r["model"], r["human"]) for d, r in decoding.items() if "model" in r]
    prompt_rows = []
    if "prompts_degeneration" in evaluation:
        prompt_rows.append(_degeneration_row(DECODING_LABELS["sample"], evaluation["prompts_degeneration"]))
    prompt_rows += [_degeneration_row(DECODING_LABELS[d], r["prompts"]) for d, r in decoding.items() if "prompts" in r]
    if not rows and not prompt_rows:
        return []
    head = ["| decoding | distinct-2 | repeated 4-grams | prompt copied | mean chars |", "|---|---|---|---|---|"]
    md = ["## Degeneration", "",
          "Character metrics of the export's continuations (evaluate.py): distinct-2 (higher is more varied), "
          "the share of 4-grams repeated within a text (0 for most human text; a model that repeats itself has "
          "most), and the share of continuations that copy their prompt. In brackets: the human text, cut to "
          "the same lengths.", ""]
    if rows:
        md += ["Continuing held-out documents:", ""] + head + rows + [""]
    if prompt_rows:
        md += ["Continuing sample.prompts:", ""] + head + prompt_rows + [""]
    default = decoding.get("default", {})
    if "settings" in default:
        chosen = {k: v for k, v in default["settings"].items() if v is not None}
        md += [f"Export default generation: {_fmt(chosen)}." if chosen else
               "Export default generation: nothing set in generation_config.json (transformers then decodes "
               "greedily).", ""]
    worst = max((default[k]["repeated_4gram_fraction"] for k in ("prompts", "model") if k in default), default=None)
    if worst is not None and worst > REPEAT_LIMIT:
        md += [f"**The export repeats itself under its default generation**: {worst:.0%} of 4-grams repeated "
               f"(limit {REPEAT_LIMIT:.0%}). Check generation_config.json (sample.* should be in it).", ""]
    return md


BENCHMARK_METRICS = ("acc", "acc_norm")  # what multiple-choice tasks report (harness.py: eval --tasks)


def benchmarks_section(scores: dict) -> list[str]:
    """Markdown: the tasks `eval --tasks` ran (the JSON harness.py writes, lm_eval.json), one row per
    task or group asked for, acc and acc_norm with their standard errors."""
    rows = []
    for name in scores.get("tasks", []):
        r = scores.get("groups", {}).get(name) or scores.get("results", {}).get(name)
        if not r:
            continue
        cells = []
        for metric in BENCHMARK_METRICS:
            value, err = r.get(f"{metric},none"), r.get(f"{metric}_stderr,none")
            cells.append("" if not isinstance(value, (int, float)) else
                         f"{value:.3f}" + (f" ± {err:.3f}" if isinstance(err, (int, float)) else ""))
        documents = scores.get("n-samples", {}).get(name, {}).get("effective", "")
        rows.append(f"| {_cell(name)} | {_cell(scores.get('n-shot', {}).get(name, ''))} | {documents} | "
                    + " | ".join(cells) + " |")
    if not rows:
        return []
    limit = scores.get("limit")
    return ["## Benchmarks (lm-evaluation-harness)", "",
            f"`eval --tasks` on {_cell(scores.get('model', '?'))}, lm_eval {scores.get('lm_eval_version', '?')}"
            + (f", --limit {limit}: a subset, not comparable with published scores" if limit else "")
            + " (lm_eval.json has every subtask and the prompts).", "",
            "| task | n-shot | documents | acc | acc_norm |", "|---|---|---|---|---|", *rows, ""]


def report_samples(evaluation: dict | None, checkpoint_rows: list[dict]) -> list[dict]:
    """The samples report.md shows, each text once: the export's continuations of sample.prompts
    (sample.* settings, then its default generation and greedy decoding; a text that two
    decodings produced alike is shown once, its heading naming both), four held-out comparisons
    with the human text, and the newest checkpoint's samples only when that checkpoint is newer
    than the export (else they are the export's own samples again)."""
    shown: dict[tuple[str, str], dict] = {}
    if evaluation:
        labelled = [("sample", x) for x in evaluation.get("samples", [])]
        labelled += [(d, x) for d, r in evaluation.get("decoding", {}).items() for x in r.get("samples", [])]
        for how, x in labelled:
            key = (x["prompt"], x["text"])
            if key in shown:
                shown[key]["decoding"] += f" = {DECODING_LABELS[how]}"
            else:
                shown[key] = {**x, "decoding": DECODING_LABELS[how]}
    samples = list(shown.values())
    if evaluation:
        samples += [{**x, "decoding": "held-out prompt, sample.* settings"}
                    for x in evaluation.get("vs_human", {}).get("examples", [])[:4]]
    if checkpoint_rows:
        newest = checkpoint_rows[-1]["step"]
        if not evaluation or evaluation.get("export_step") is None or newest > evaluation["export_step"]:
            samples += [r for r in checkpoint_rows if r["step"] == newest]
    return samples


def write_run_report(out_dir: Path, metrics_jsonl_text: str, summary: dict, evaluation: dict | None = None,
                     checkpoint_samples_jsonl: str = "", train_cfg=None) -> list[Path]:
    """The run report of `entrypoint.py run` / `report`: write_report plus TensorBoard events, with
    the export's evaluation (evaluate.evaluate_model's dict: held-out bits/char, samples, model vs
    human continuations, degeneration by decoding) and the samples taken at checkpoints (loop.py's
    samples.jsonl) folded in, and the benchmark scores of `eval --tasks` when out_dir holds them
    (lm_eval.json). train_cfg: the TrainConfig the run trained with (max_steps as run), whose whole
    lr schedule, warm-up included, is drawn in lr.png."""
    summary, sections = dict(summary), []
    if evaluation:
        if "heldout" in evaluation:
            summary["final held-out bits/char (export)"] = round(evaluation["heldout"]["bits_per_char"], 4)
        for who in ("model", "human"):
            if "vs_human" in evaluation:
                r = evaluation["vs_human"][who]
                summary[f"{who} continuations: distinct-1 / distinct-2 / repeated 4-grams"] = (
                    f"{r['distinct_1']:.3f} / {r['distinct_2']:.3f} / {r['repeated_4gram_fraction']:.3f}")
        for d, r in evaluation.get("decoding", {}).items():
            r = r.get("model") or r.get("prompts")
            if r:
                summary[f"{DECODING_LABELS[d]}: distinct-2 / repeated 4-grams"] = (
                    f"{r['distinct_2']:.3f} / {r['repeated_4gram_fraction']:.3f}")
        sections = degeneration_section(evaluation)
    rows = [json.loads(line) for line in checkpoint_samples_jsonl.splitlines() if line.strip()]
    if rows:
        by_step = {r["step"]: r for r in rows}  # the metrics are per step (pooled over its prompts)
        summary["checkpoint samples distinct-2 by step"] = ", ".join(
            f"{s}: {r['distinct_2']:.2f}" for s, r in sorted(by_step.items()))
    samples = report_samples(evaluation, rows)
    scores = Path(out_dir) / RESULTS_FILE  # stage_report keeps it from the last report
    if scores.is_file():
        sections += benchmarks_section(json.loads(scores.read_text(encoding="utf-8")))
    schedule = lr_schedule_series(train_cfg) if train_cfg is not None else None
    written = write_report(metrics_jsonl_text, out_dir, samples, summary, schedule, sections)
    return written + write_tensorboard(parse_metrics(metrics_jsonl_text)[0], Path(out_dir) / "tensorboard")
