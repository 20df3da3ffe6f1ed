"""``distill report RUN... --out DIR``: the paper's tables and figures from ``distill eval`` files.

One Markdown table in the shape of the paper's Tables 1–4 (a row per model: parameters, how it was
trained, its temperature, each metric) and PNG bar charts like its Figures 1–5 (completion tasks,
perplexities, QA exact match by number of shots, teacher agreement), written to DIR with the
combined numbers as ``report.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import check, option
from pipeline.errors import DistillError
from pipeline.io import atomic_write_bytes, atomic_write_text

# (task, metric, column title, higher is better)
COLUMNS = (
    ("heldout", "ppl", "held-out ppl", False),
    ("heldout", "bits_per_byte", "bits/byte", False),
    ("lambada", "acc", "LAMBADA acc", True),
    ("lambada", "ppl", "LAMBADA ppl", False),
    ("storycloze", "acc", "StoryCloze acc", True),
    ("hellaswag", "acc", "HellaSwag acc", True),
    ("hellaswag", "acc_norm", "HellaSwag acc_norm", True),
    ("agreement", "top1", "teacher top-1 agreement", True),
    ("agreement", "kl", "KL(teacher‖model)", False),
)
QA_NAMES = {"nq": "NQ", "webq": "WebQ", "triviaqa": "TriviaQA"}


@dataclass(frozen=True)
class ReportConfig:
    runs: tuple[str, ...] = option((), "Result files of `distill eval` (JSON), in the order of the table's rows, "
                                   "or directories of them (taken in name order).")
    out: str = option("", "Output directory: report.md, report.json and the PNG figures.")
    title: str = option("Teacher, distilled students and a cross-entropy-only student",
                        "Heading of the report.")

    def __post_init__(self):
        problems = []
        if not self.runs:
            problems.append("no eval result files given")
        if not self.out:
            problems.append("no --out given")
        check(problems, "report")


def load_run(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DistillError(f"{path}: no such eval result; run `distill eval --out {path}` first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DistillError(f"{path}: not a JSON file ({e.msg} at line {e.lineno}); pass the files distill eval "
                           "wrote (rerun it if this one was cut short)") from None
    if not isinstance(data, dict) or "tasks" not in data or "name" not in data:
        raise DistillError(f"{path}: not a `distill eval` result (no 'name' and 'tasks'); pass the files "
                           "distill eval wrote")
    return data


def training_label(run: dict[str, Any]) -> tuple[str, str]:
    """(how it was trained, its distillation temperature) for the table."""
    t = run.get("training", {})
    if not t:
        return "given", "–"
    if t.get("alpha", 1.0) >= 1.0 or t.get("teacher_source") == "none":
        return "cross-entropy", "–"
    temperature = f"{t.get('temperature', 1.0):g}"
    if t.get("teacher_signal") == "StoredSampled":  # drawn targets: no tail treatment to name
        return f"distilled (α={t['alpha']:g}, sampled store)", temperature
    source = "online" if t.get("teacher_source") == "online" else "top-k store"
    return f"distilled (α={t['alpha']:g}, {t.get('tail', 'tail')}, {source})", temperature


def columns(runs: list[dict[str, Any]]) -> list[tuple[str, str, str, bool]]:
    """The metrics any run has, in table order; QA exact match per dataset and number of shots."""
    cols = [c for c in COLUMNS if any(c[1] in r["tasks"].get(c[0], {}) for r in runs)]
    for task, title in QA_NAMES.items():
        keys = sorted({k for r in runs for k in r["tasks"].get(task, {}) if k.startswith("em_")},
                      key=lambda k: int(k[3:-4]))
        cols += [(task, k, f"{title} EM {k[3:-4]}-shot", True) for k in keys]
    return cols


def _fmt(value: Any, metric: str) -> str:
    if value is None:
        return "–"
    if metric in ("acc", "acc_norm", "top1") or metric.startswith("em_"):
        return f"{100 * value:.1f}"
    return f"{value:.2f}" if value >= 10 else f"{value:.3f}"


def markdown(runs: list[dict[str, Any]], cols, title: str, figures: list[str], sources: list[str]) -> str:
    head = ["model", "parameters", "training", "T"] + [c[2] + (" ↑" if c[3] else " ↓") for c in cols]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        trained, temp = training_label(r)
        cells = [r["name"], f"{r['parameters'] / 1e6:.2f}M", trained, temp]
        cells += [_fmt(r["tasks"].get(task, {}).get(metric), metric) for task, metric, _, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracies and exact match in %; perplexities per token (held-out: per token of the",
              "model's tokenizer) and per word for LAMBADA's last word; ↑ higher is better, ↓ lower.", ""]
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    lines += ["", "Sources: " + ", ".join(f"`{s}`" for s in sources), ""]
    return "\n".join(lines)


def bar_chart(runs, cols, title: str, ylabel: str, path: Path, percent: bool) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [c for c in cols if any(c[1] in r["tasks"].get(c[0], {}) for r in runs)]
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups) + 1.5), 3.6), dpi=120)
    for i, r in enumerate(runs):
        values = [r["tasks"].get(task, {}).get(metric) for task, metric, _, _ in groups]
        xs = [g + (i - (len(runs) - 1) / 2) * width for g in range(len(groups))]
        heights = [(100 * v if percent else v) if v is not None else 0.0 for v in values]
        trained, temp = training_label(r)
        label = r["name"] + (f" (T={temp})" if temp != "–" else "")
        bars = ax.bar(xs, heights, width, label=label)
        for bar, v in zip(bars, heights):
            ax.annotate(f"{v:.1f}" if percent or v >= 10 else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)), [c[2].replace(" acc", "\nacc").replace(" EM", "\nEM").replace(" ppl", "\nppl")
                                       for c in groups], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def make_report(config: ReportConfig) -> Path:
    paths = []
    for p in map(Path, config.runs):
        found = sorted(p.glob("*.json")) if p.is_dir() else [p]
        if not found:
            raise DistillError(f"{p} holds no eval result files (*.json); run distill eval --out {p}/NAME.json "
                               "first or pass the files themselves")
        paths += found
    runs = [load_run(p) for p in paths]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = columns(runs)
    figures = []
    charts = (
        ("completion.png", "Completion tasks", "accuracy (%)", True,
         [c for c in cols if c[0] in ("lambada", "storycloze", "hellaswag") and c[1] != "ppl"]),
        ("perplexity.png", "Perplexity (lower is better)", "perplexity", False,
         [c for c in cols if c[1] == "ppl"]),
        ("qa.png", "Open-domain QA", "exact match (%)", True, [c for c in cols if c[1].startswith("em_")]),
        ("agreement.png", "Agreement with the teacher", "top-1 agreement (%)", True,
         [c for c in cols if c[1] == "top1"]),
    )
    for name, title, ylabel, percent, chosen in charts:
        if chosen:
            bar_chart(runs, chosen, title, ylabel, out / name, percent)
            figures.append(name)
    atomic_write_text(out / "report.md", markdown(runs, cols, config.title, figures, [str(p) for p in paths]))
    combined = {"runs": [{k: r[k] for k in ("name", "model", "parameters", "training", "tasks")} for r in runs],
                "sources": [str(p) for p in paths]}
    atomic_write_text(out / "report.json", json.dumps(combined, indent=2, sort_keys=True) + "\n")
    print((out / "report.md").read_text())
    print(f"{out}: report.md, report.json, {', '.join(figures) or 'no figures'}")
    return out / "report.md"
