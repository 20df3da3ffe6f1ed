"""``distill report RUN... --out DIR``: the paper's tables and figures from ``distill eval`` files.

One Markdown table with a row per run (parameters, how it was trained, its temperature, each metric)
and PNG bar charts like the paper's Figures 1–5; then the paper's layout over runs grouped by seed
(mean ± sample sd): Table 1 (completion tasks) and Table 2 (QA exact match at 0, 1 and k shots) with
a "kept of teacher" column per metric, each distilled student against the same-size CE-only one
(difference and whether it exceeds the seed spread), QA under rules where the results have rule
metrics, the lm-evaluation-harness tasks of ``distill eval --harness`` (Table 3, metrics named
``harness/TASK`` ``METRIC``), and — when distilled runs differ only in T or only in α — the temperature study's curves
(``sweep_temperature.png``, ``sweep_alpha.png``). Everything goes to DIR, the numbers also to
``report.json``.
"""

from __future__ import annotations

import json
import re
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
    ("agreement", "top1_1to1", "teacher top-1 agreement over 1:1 chunks", True),
    ("agreement", "kl_1to1", "KL(teacher‖model) over 1:1 chunks", False),
)
QA_NAMES = {"nq": "NQ", "webq": "WebQ", "triviaqa": "TriviaQA", "custom": "custom task"}


@dataclass(frozen=True)
class ReportConfig:
    runs: tuple[str, ...] = option((), "Result files of `distill eval` (JSON), in the order of the table's rows, "
                                   "or directories of them (taken in name order).")
    out: str = option("", "Output directory: report.md, report.json and the PNG figures.")
    title: str = option("Teacher, distilled students and a cross-entropy-only student",
                        "Heading of the report.")
    teacher: str = option("auto", "Run (or seed group) whose numbers the 'kept of teacher' columns divide by: "
                          "'auto' = the one model larger than every other, a run's name, or 'none' (no kept "
                          "columns).")
    sweep: str = option("auto", "Metric-vs-T and metric-vs-alpha figures: 'auto' (when distilled runs differ only "
                        "in T or only in alpha), 'on' (the same, an error when there is no such series), 'off'.")

    def __post_init__(self):
        problems = []
        if not self.runs:
            problems.append("no eval result files given")
        if not self.out:
            problems.append("no --out given")
        if not self.teacher:
            problems.append("--teacher must be 'auto', 'none' or a run's name")
        if self.sweep not in ("auto", "on", "off"):
            problems.append(f"--sweep must be auto, on or off, got {self.sweep!r}")
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
    data["tasks"] = {**data["tasks"], **harness_metrics(data)}
    return data


HARNESS = "harness/"  # the prefix of lm-evaluation-harness tasks among a run's tasks
HARNESS_PERCENT = ("acc", "acc_norm", "acc_mutual_info", "exact_match", "em", "f1", "mc1", "mc2")


def harness_shown(harness: dict[str, Any]) -> list[str]:
    """The harness tasks a report shows: each requested task or group that has metrics (a group
    with an aggregate, like mmlu, is one task), else its subtasks; a tag's tasks (a tag is not in
    the results) are every task that is no group's subtask."""
    tasks = harness.get("tasks", {})
    subtasks = {s for e in tasks.values() for s in e.get("subtasks", ())}
    shown: list[str] = []
    for name in harness.get("requested", ()):
        entry = tasks.get(name)
        if entry and entry.get("metrics"):
            names = [name]
        elif entry:
            names = list(entry.get("subtasks", ()))
        else:
            names = [t for t in tasks if t not in subtasks]
        shown += [t for t in names if t not in shown and tasks.get(t, {}).get("metrics")]
    return shown


def harness_metrics(run: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """A run's shown harness results as tasks like any other: ``harness/TASK`` → {metric: value}."""
    harness = run.get("harness") or {}
    return {HARNESS + t: {m: v["value"] for m, v in harness["tasks"][t]["metrics"].items()}
            for t in harness_shown(harness)}


def harness_columns(runs: list[dict[str, Any]]) -> list[tuple[str, str, str, bool]]:
    """(harness/TASK, metric, title, higher is better) for every harness metric any run shows, in the
    order the runs name them; the direction is lm-eval's higher_is_better."""
    cols: dict[tuple[str, str], tuple[str, str, str, bool]] = {}
    for r in runs:
        harness = r.get("harness") or {}
        for task in harness_shown(harness):
            entry = harness["tasks"][task]
            for metric in entry["metrics"]:
                better = bool(entry.get("higher_is_better", {}).get(metric, True))
                cols.setdefault((HARNESS + task, metric), (HARNESS + task, metric, f"{task} {metric}", better))
    return list(cols.values())


STORE_NAMES = {"topk": "top-k store", "sampled": "sampled store", "hybrid": "hybrid store", "target": "target store"}


def training_label(run: dict[str, Any]) -> tuple[str, str]:
    """(how it was trained, its distillation temperature) for the table; a run that started from an
    earlier model (fine-tuning) names it."""
    t = run.get("training", {})
    if not t:
        return "given", "–"
    init = Path(str(t.get("init", "")))
    origin = f", from {init.parent.name if init.name == 'model' else init.name}" \
        if t.get("init") and init.suffix not in (".json", ".yaml", ".yml") else ""
    if t.get("alpha", 1.0) >= 1.0 or t.get("teacher_source") == "none":
        return "cross-entropy" + origin, "–"
    temperature = f"{t.get('temperature', 1.0):g}"
    if t.get("cross_tokenizer"):  # a teacher store of another tokenizer
        return f"distilled (α={t['alpha']:g}, across tokenizers, {t['cross_tokenizer']}){origin}", temperature
    if t.get("teacher_source") == "online":  # the full vocabulary: no tail treatment to name
        return f"distilled (α={t['alpha']:g}, online){origin}", temperature
    if "store_kind" in t:  # what the run used: a sampled store's draws have no tail treatment (tail None)
        kind, tail = t["store_kind"], t.get("tail")
    else:  # metrics.json before store_kind: drawn targets were a sampled store's (or a hybrid's, unrecorded)
        kind = "sampled" if t.get("teacher_signal") == "StoredSampled" else "topk"
        tail = None if kind == "sampled" else t.get("tail", "tail")
    # an on-policy objective (#25), with the policy gradient's ratio treatment
    objective = " ".join(str(t[k]) for k in ("objective", "ratio") if t.get(k))
    what = ", ".join(part for part in (objective, tail, STORE_NAMES.get(kind, f"{kind} store")) if part)
    return f"distilled (α={t['alpha']:g}, {what}){origin}", temperature


def across_tokenizers(runs: list[dict[str, Any]]) -> bool:
    """Whether the runs' models have more than one tokenizer (eval results since #23 record its hash)."""
    return len({r.get("tokenizer_hash") for r in runs if r.get("tokenizer_hash")}) > 1


def columns(runs: list[dict[str, Any]]) -> list[tuple[str, str, str, bool]]:
    """The metrics any run has, in table order; QA exact match per dataset and number of shots."""
    cols = [c for c in COLUMNS if any(c[1] in r["tasks"].get(c[0], {}) for r in runs)]
    if across_tokenizers(runs):  # per-token numbers are not comparable: bits per byte leads
        cols = sorted(cols, key=lambda c: c[1] != "bits_per_byte")
    for task, title in QA_NAMES.items():
        keys = sorted({k for r in runs for k in r["tasks"].get(task, {}) if k.startswith("em_")},
                      key=lambda k: int(k[3:-4]))
        cols += [(task, k, f"{title} EM {k[3:-4]}-shot", True) for k in keys]
    return cols + harness_columns(runs)


def _fmt(value: Any, metric: str) -> str:
    if value is None:
        return "–"
    if _percent(metric):
        return f"{100 * value:.1f}"
    return f"{value:.2f}" if value >= 10 else f"{value:.3f}"


def markdown(runs: list[dict[str, Any]], cols, title: str, figures: list[str], sources: list[str],
             sections: list[str] = ()) -> str:
    head = ["model", "parameters", "training", "T"] + [c[2] + (" ↑" if c[3] else " ↓") for c in cols]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        trained, temp = training_label(r)
        cells = [r["name"], f"{r['parameters'] / 1e6:.2f}M", trained, temp]
        cells += [_fmt(r["tasks"].get(task, {}).get(metric), metric) for task, metric, _, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracies and exact match in %; perplexities per token (held-out: per token of the",
              "model's tokenizer) and per word for LAMBADA's last word; ↑ higher is better, ↓ lower.", ""]
    if across_tokenizers(runs):
        lines[2:2] = ["These models use different tokenizers: compare them by held-out **bits per byte** (first "
                      "column); per-token perplexities count different tokens, and agreement with a teacher of "
                      "another tokenizer is over the 1:1 chunks only.", ""]
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    lines += list(sections)
    lines += ["", "Sources: " + ", ".join(f"`{s}`" for s in sources), ""]
    return "\n".join(lines)


def pyplot():
    """matplotlib's pyplot on the file-only backend (imported here: eval and the other stages never need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically, then free it."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def bar_chart(runs, cols, title: str, ylabel: str, path: Path, percent: bool) -> None:
    plt = pyplot()
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
    save_png(fig, path)


# ------------------------------------------------------------------------------------------------
# seed groups, teacher, CE-only baselines: the paper's Tables 1–4 and the temperature study

SPREAD = "sample standard deviation over seeds (n − 1 in the denominator)"
RESULT_FACTS = ("seed", "heldout_loss", "heldout_ppl", "heldout_tokens")  # not how a run was trained
PAPER_COMPLETION = (("lambada", "acc"), ("lambada", "ppl"), ("storycloze", "acc"), ("hellaswag", "acc"))
COMPARED = (("heldout", "ppl"),) + PAPER_COMPLETION  # and QA exact match: distilled against CE-only


def seed_of(run: dict[str, Any]) -> int | None:
    """The training seed: eval's training facts, else the `distill student` run's config.json beside the model
    (for models trained before stage two's metrics.json recorded it)."""
    t = run.get("training") or {}
    if "seed" in t:
        return t["seed"]
    model = Path(str(run.get("model", "")))
    config = model.parent / "config.json"
    if t and model.name == "model" and config.is_file():
        try:
            seed = json.loads(config.read_text())["config"]["seed"]  # save_resolved's layout
        except (json.JSONDecodeError, KeyError, TypeError):
            return None
        return seed if isinstance(seed, int) else None
    return None


@dataclass
class Stat:
    mean: float
    sd: float | None  # sample std over seeds; None with one seed
    lo: float
    hi: float
    n: int

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "sd": self.sd, "min": self.lo, "max": self.hi, "n": self.n}


@dataclass
class Group:
    """Runs that differ only by seed: one row of the paper's tables, mean ± spread over the seeds."""
    name: str
    runs: list[dict[str, Any]]
    seeds: list[int | None]

    @property
    def training(self) -> dict[str, Any]:
        return {k: v for k, v in (self.runs[0].get("training") or {}).items() if k not in RESULT_FACTS}

    @property
    def parameters(self) -> int:
        return self.runs[0]["parameters"]

    @property
    def distilled(self) -> bool:
        t = self.training
        return bool(t) and t.get("alpha", 1.0) < 1.0 and t.get("teacher_source") != "none"

    def stat(self, task: str, metric: str) -> Stat | None:
        values = [r["tasks"].get(task, {}).get(metric) for r in self.runs]
        values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not values:
            return None
        n, mean = len(values), sum(values) / len(values)
        sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else None
        return Stat(mean, sd, min(values), max(values), n)

    def harness_shots(self) -> str:
        """lm-eval's n-shot of the group's harness tasks: one number when they agree, else per task."""
        shots = {t: e.get("n_shot") for r in self.runs for t, e in (r.get("harness") or {}).get("tasks", {}).items()
                 if HARNESS + t in r["tasks"]}
        if len(set(shots.values())) <= 1:
            return str(next(iter(shots.values()), "–"))
        return ", ".join(f"{t}: {n}" for t, n in sorted(shots.items()))

    def formats(self) -> str:
        """The QA prompt format(s) behind the exact-match numbers (the eval result's `format`)."""
        found = {task: r["tasks"][task]["format"] for r in self.runs for task in QA_NAMES
                 if isinstance(r["tasks"].get(task), dict) and "format" in r["tasks"][task]}
        if len(set(found.values())) <= 1:
            return next(iter(found.values()), "–")
        return ", ".join(f"{QA_NAMES[t]}: {f}" for t, f in sorted(found.items()))


def harness_versions(groups: list[Group]) -> list[str]:
    """The lm_eval versions behind the groups' harness numbers."""
    return sorted({str(r["harness"].get("lm_eval_version")) for g in groups for r in g.runs if r.get("harness")})


def group_runs(runs: list[dict[str, Any]]) -> list[Group]:
    """Group runs whose model size and training facts agree except for the seed (runs without a known
    seed stay alone), in the order of their first run."""
    groups: dict[Any, Group] = {}
    for i, r in enumerate(runs):
        seed = seed_of(r)
        # an option recorded as "" (not used) is the same run as one that did not record it yet
        facts = {k: v for k, v in (r.get("training") or {}).items() if k not in RESULT_FACTS and v != ""}
        key = (r["parameters"], json.dumps(facts, sort_keys=True)) if facts and seed is not None else ("alone", i)
        if key not in groups:
            groups[key] = Group(re.sub(r"[-_.]?(s|seed)\d+$", "", r["name"]) if seed is not None else r["name"], [], [])
        groups[key].runs.append(r)
        groups[key].seeds.append(seed)
    out = list(groups.values())
    for g in out:
        if len(g.runs) == 1:
            g.name = g.runs[0]["name"]
    return out


def find_teacher(groups: list[Group], choice: str) -> tuple[Group | None, str]:
    """(the teacher group, why it was chosen or why there is none)."""
    if choice == "none":
        return None, "no teacher (--teacher none): kept-of-teacher columns omitted"
    if choice != "auto":
        for g in groups:
            if choice == g.name or any(choice == r["name"] for r in g.runs):
                return g, f"teacher: {g.name} (--teacher {choice})"
        raise DistillError(f"--teacher {choice}: no run of that name among {', '.join(g.name for g in groups)}; "
                           "pass one of these names, auto or none")
    largest = max(g.parameters for g in groups)
    top = [g for g in groups if g.parameters == largest]
    if len(top) == 1 and len(groups) > 1 and not top[0].distilled:
        return top[0], (f"teacher: {top[0].name}, the largest model ({largest / 1e6:.2f}M parameters; "
                        "--teacher NAME picks another)")
    return None, ("no teacher identified (no single model larger than every other, or it was distilled): "
                  "kept-of-teacher columns omitted; pass --teacher NAME")


def kept(student: Stat | None, teacher: Stat | None, higher_better: bool) -> float | None:
    """Share of the teacher's score the student keeps: student ÷ teacher for accuracies, teacher ÷ student
    for perplexities (the paper: a 320M student keeps 78% of a 950M teacher's LAMBADA accuracy)."""
    if student is None or teacher is None:
        return None
    num, den = (student.mean, teacher.mean) if higher_better else (teacher.mean, student.mean)
    return num / den if den > 0 else None


def ce_baseline(g: Group, groups: list[Group], teacher: Group | None) -> Group | None:
    """The CE-only group of the same size, preferring one trained for as many steps on as many tokens."""
    ces = [c for c in groups if c is not teacher and c.training and not c.distilled and c.parameters == g.parameters]
    same = [c for c in ces if (c.training.get("step"), c.training.get("tokens")) ==
            (g.training.get("step"), g.training.get("tokens"))]
    return (same or ces or [None])[0]


def _percent(metric: str) -> bool:
    return metric in ("acc", "acc_norm", "top1", "top1_1to1") or metric.startswith(("em_", "rules_em_", "violating_",
                                                                        "rules_violating_", "rules_unsatisfiable_")) \
        or metric.split(",")[0] in HARNESS_PERCENT  # lm-eval's: exact_match,strict-match


def _num(value: float, metric: str) -> str:
    if _percent(metric):
        return f"{100 * value:.1f}"
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"


def _stat(s: Stat | None, metric: str) -> str:
    if s is None:
        return "–"
    return _num(s.mean, metric) + (f" ± {_num(s.sd, metric)}" if s.sd is not None else "")


def _kept(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _seeds(g: Group) -> str:
    known = [s for s in g.seeds if s is not None]
    return f"{len(g.runs)} ({', '.join(map(str, known))})" if known else "–"  # one run: "1 (0)", never a bare seed


def difference(a: Stat | None, b: Stat | None) -> dict[str, Any] | None:
    """Student − CE-only, and whether it exceeds the seed spread: |Δ| > sd(student) + sd(CE), a side with
    one seed taking the other side's sd; not judged (None) when neither side has several seeds."""
    if a is None or b is None:
        return None
    sds = [s.sd for s in (a, b) if s.sd is not None]
    spread = None if not sds else (a.sd if a.sd is not None else sds[0]) + (b.sd if b.sd is not None else sds[0])
    delta = a.mean - b.mean
    return {"delta": delta, "spread": spread, "exceeds": None if spread is None else abs(delta) > spread}


def qa_columns(groups: list[Group]) -> list[tuple[str, str, str, bool]]:
    """(task, em_Kshot, title, True) for the paper's 0, 1 and k shots each QA task has."""
    cols = []
    for task, title in QA_NAMES.items():
        shots = sorted({int(k[3:-4]) for g in groups for r in g.runs for k in r["tasks"].get(task, {})
                        if re.fullmatch(r"em_\d+shot", k)})
        cols += [(task, f"em_{k}shot", f"{title} {k}-shot", True) for k in shots]
    return cols


def paper_table(groups: list[Group], teacher: Group | None, cols, extra: dict[str, Any] | None = None) -> list[str]:
    head = ["model", "parameters", "training", "T", "seeds"] + (list(extra) if extra else [])
    for _, _, title, better in cols:
        head += [title + (" ↑" if better else " ↓")] + (["kept"] if teacher is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        trained, temp = training_label(g.runs[0])
        name = g.name + (" (teacher)" if g is teacher and "teacher" not in g.name else "")
        cells = [name, f"{g.parameters / 1e6:.2f}M", trained, temp, _seeds(g)]
        cells += [f(g) for f in (extra or {}).values()]
        for task, metric, _, better in cols:
            s = g.stat(task, metric)
            cells.append(_stat(s, metric))
            if teacher is not None:
                cells.append("–" if g is teacher else _kept(kept(s, teacher.stat(task, metric), better)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def rules_rows(groups: list[Group]) -> list[dict[str, Any]]:
    """Per group, QA task and shots: exact match and share of answers breaking a rule, without and with the
    rules enforced while decoding (`distill eval --rules`)."""
    rows = []
    for g in groups:
        for task in QA_NAMES:
            keys = {k for r in g.runs for k in r["tasks"].get(task, {})}
            for shots in sorted({m.group(1) for k in keys if (m := re.fullmatch(r"rules_em_(\d+shot)", k))},
                                key=lambda s: int(s[:-4])):
                per_rule = sorted(k[len(f"violating_{shots}_"):] for k in keys if k.startswith(f"violating_{shots}_"))
                rows.append({"group": g.name, "task": task, "shots": int(shots[:-4]),
                             **{name: g.stat(task, key.format(s=shots)) for name, key in (
                                 ("em", "em_{s}"), ("rules_em", "rules_em_{s}"), ("violating", "violating_{s}"),
                                 ("rules_violating", "rules_violating_{s}"),
                                 ("rules_unsatisfiable", "rules_unsatisfiable_{s}"))},
                             "per_rule": {rule: g.stat(task, f"violating_{shots}_{rule}") for rule in per_rule}})
    return rows


def sweep_series(groups: list[Group], axis: str) -> list[Group]:
    """The longest series of distilled groups that differ only in ``axis`` (temperature or alpha), by axis value."""
    series: dict[str, list[Group]] = {}
    for g in groups:
        if g.distilled:
            rest = {k: v for k, v in g.training.items() if k != axis}
            series.setdefault(json.dumps([g.parameters, rest], sort_keys=True), []).append(g)
    best = max(series.values(), key=lambda s: len({g.training.get(axis, 1.0) for g in s}), default=[])
    if len({g.training.get(axis, 1.0) for g in best}) < 2:
        return []
    return sorted(best, key=lambda g: g.training.get(axis, 1.0))


def sweep_figure(series: list[Group], axis: str, cols, ce: Group | None, teacher: Group | None, path: Path) -> None:
    """One panel per metric: the metric (mean, seed sd as error bars) against T or α, the CE-only student and
    the teacher as horizontal lines; perplexity axes logarithmic."""
    plt = pyplot()
    panels = [c for c in cols if any(g.stat(c[0], c[1]) for g in series)]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), dpi=120, squeeze=False)
    symbol = "T" if axis == "temperature" else "α"
    fixed = "alpha" if axis == "temperature" else "temperature"
    for ax, (task, metric, title, better) in zip(axes.flat, panels):
        scale = 100 if _percent(metric) else 1
        pts = [(g.training.get(axis, 1.0), g.stat(task, metric)) for g in series]
        pts = [(x, s) for x, s in pts if s is not None]
        ax.errorbar([x for x, _ in pts], [scale * s.mean for _, s in pts],
                    yerr=[scale * (s.sd or 0.0) for _, s in pts], marker="o", capsize=3, label="distilled")
        for ref, style, label in ((ce, dict(color="gray", ls="--"), "CE-only"),
                                  (teacher, dict(color="black", ls=":"), "teacher")):
            s = ref.stat(task, metric) if ref is not None else None
            if s is not None:
                ax.axhline(scale * s.mean, label=label + (f" (n={s.n})" if s.n > 1 else ""), **style)
                if s.sd:
                    ax.axhspan(scale * (s.mean - s.sd), scale * (s.mean + s.sd), color=style["color"], alpha=0.12)
        if metric == "ppl":
            ax.set_yscale("log")
        ax.set_title(title + (" ↑" if better else " ↓"), fontsize=9)
        ax.set_xlabel(symbol)
        ax.tick_params(labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, frameon=False)
    n = max(len(g.runs) for g in series)
    fig.suptitle(f"Students against {symbol} ({'α' if fixed == 'alpha' else 'T'} = {series[0].training.get(fixed, 1.0):g}; "
                 f"mean ± sd over up to {n} seed(s))", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)


def paper_sections(groups: list[Group], teacher: Group | None, teacher_note: str, cols, sweeps) -> tuple[list[str], dict]:
    """The Markdown of the paper's tables, the CE comparison, the rules table and the sweep tables, and their
    numbers for report.json."""
    numbers: dict[str, Any] = {"teacher": teacher.name if teacher else None, "teacher_rule": teacher_note,
                               "spread": SPREAD}
    lines = ["", "## The paper's tables", "", teacher_note + ".",
             f"Rows are runs that differ only by seed: mean ± {SPREAD}; `seeds` is n (and the seeds).",
             "Kept = student ÷ teacher for accuracies, teacher ÷ student for perplexities." if teacher else "",
             "T and α as trained.", ""]
    completion = [c for c in cols if (c[0], c[1]) in PAPER_COMPLETION]
    if completion:
        lines += ["### Table 1 — completion tasks (the paper's Tables 1 and 3)", ""]
        lines += paper_table(groups, teacher, completion) + [""]
    qa = qa_columns(groups)
    cols = [c for c in cols if c[0] not in QA_NAMES]  # QA comes back as `qa`
    if qa:
        lines += ["### Table 2 — open-domain QA, exact match by shots (the paper's Tables 2 and 4)", ""]
        lines += paper_table(groups, teacher, qa, {"QA format": Group.formats}) + [""]
        lines += ["`QA format`: the prompt format the eval result names for its QA numbers (– when it names none).", ""]
    harness = [c for c in cols if c[0].startswith(HARNESS)]
    if harness:
        lines += ["### Table 3 — lm-evaluation-harness tasks (`distill eval --harness`)", ""]
        lines += paper_table(groups, teacher, harness, {"shots": Group.harness_shots}) + [""]
        lines += ["Scored by lm-evaluation-harness itself (lm_eval " + ", ".join(harness_versions(groups))
                  + "); `shots`: its n-shot per task. lm-eval's own stderr of each number is in the eval JSON.", ""]
    groups_json = []
    for g in groups:
        metrics = {f"{t}.{m}": s.as_dict() for t, m, _, _ in cols + qa if (s := g.stat(t, m)) is not None}
        entry = {"name": g.name, "runs": [r["name"] for r in g.runs], "seeds": g.seeds, "parameters": g.parameters,
                 "training": g.training, "distilled": g.distilled, "metrics": metrics}
        if teacher is not None and g is not teacher:
            entry["kept_of_teacher"] = {f"{t}.{m}": k for t, m, _, b in completion + qa + harness
                                        if (k := kept(g.stat(t, m), teacher.stat(t, m), b)) is not None}
        groups_json.append(entry)
    numbers["groups"] = groups_json

    pairs = [(g, ce) for g in groups if g.distilled and (ce := ce_baseline(g, groups, teacher)) is not None]
    comparison = []
    if pairs:
        lines += ["### Distilled against the same-size CE-only student", "",
                  "Δ = distilled − CE-only (points for accuracies). Beyond spread: |Δ| > sd(distilled) + sd(CE-only), "
                  "a side with one seed taking the other's sd; – when neither side has several seeds.", "",
                  "| distilled | CE-only | metric | distilled | CE-only | Δ | spread | beyond spread |",
                  "|---|---|---|---|---|---|---|---|"]
        for g, ce in pairs:
            for task, metric, title, better in [c for c in cols if (c[0], c[1]) in COMPARED] + qa + harness:
                d = difference(g.stat(task, metric), ce.stat(task, metric))
                if d is None:
                    continue
                comparison.append({"distilled": g.name, "ce": ce.name, "metric": f"{task}.{metric}", **d})
                sign = "+" if d["delta"] >= 0 else "−"
                verdict = "–" if d["exceeds"] is None else ("yes" if d["exceeds"] else "no")
                spread = "–" if d["spread"] is None else _num(d["spread"], metric)
                lines.append(f"| {g.name} | {ce.name} | {title} {'↑' if better else '↓'} | "
                             f"{_stat(g.stat(task, metric), metric)} | {_stat(ce.stat(task, metric), metric)} | "
                             f"{sign}{_num(abs(d['delta']), metric)} | {spread} | {verdict} |")
        lines.append("")
    numbers["comparison"] = comparison

    rows = rules_rows(groups)
    if rows:
        lines += ["### QA under rules (`distill eval --rules`)", "",
                  "EM and the share of answers breaking any rule: free generation, and with the rules enforced while "
                  "decoding; unsatisfiable = answers the rules left no token for; per rule: free answers breaking it.",
                  "", "| model | task | shots | EM | EM with rules | violating | violating with rules | "
                  "unsatisfiable | violating per rule |", "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            per_rule = ", ".join(f"{rule} {_stat(s, 'violating_')}" for rule, s in row["per_rule"].items()) or "–"
            cells = [row["group"], QA_NAMES[row["task"]], str(row["shots"])]
            cells += [_stat(row[k], "em_") for k in ("em", "rules_em", "violating", "rules_violating",
                                                     "rules_unsatisfiable")]
            lines.append("| " + " | ".join(cells + [per_rule]) + " |")
        lines += ["", "All in %.", ""]
    numbers["rules"] = [{**{k: (v.as_dict() if isinstance(v, Stat) else v) for k, v in row.items() if k != "per_rule"},
                         "per_rule": {r: s.as_dict() for r, s in row["per_rule"].items() if s}} for row in rows]

    numbers["sweep"] = {}
    for axis, series, figure in sweeps:
        symbol = "T" if axis == "temperature" else "α"
        ce = ce_baseline(series[0], groups, teacher)
        metrics = [c for c in cols + qa if any(g.stat(c[0], c[1]) for g in series)]
        lines += [f"## The temperature study: metric against {symbol}", "",
                  f"Distilled students differing only in {symbol}; mean ± sd over seeds, n in `seeds`.", "",
                  "| " + " | ".join([symbol, "model", "seeds"] + [c[2] + (" ↑" if c[3] else " ↓") for c in metrics]) + " |",
                  "|" + "---|" * (3 + len(metrics))]
        refs = [(g, f"{g.training.get(axis, 1.0):g}") for g in series] + [(r, "–") for r in (ce, teacher) if r]
        for g, x in refs:
            lines.append("| " + " | ".join([x, g.name, _seeds(g)] + [_stat(g.stat(t, m), m) for t, m, _, _ in metrics]) + " |")
        lines += ["", f"![sweep {symbol}]({figure})", ""]
        numbers["sweep"][axis] = {"figure": figure, "ce": ce.name if ce else None,
                                  "points": [{"x": g.training.get(axis, 1.0), "group": g.name} for g in series]}
    return lines, numbers


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
        ("harness.png", "lm-evaluation-harness", "score (%)", True,
         [c for c in cols if c[0].startswith(HARNESS) and _percent(c[1])]),
    )
    for name, title, ylabel, percent, chosen in charts:
        if chosen:
            bar_chart(runs, chosen, title, ylabel, out / name, percent)
            figures.append(name)
    groups = group_runs(runs)
    teacher, teacher_note = find_teacher(groups, config.teacher)
    sweeps = []
    if config.sweep != "off":
        for axis, figure in (("temperature", "sweep_temperature.png"), ("alpha", "sweep_alpha.png")):
            if series := sweep_series(groups, axis):
                sweep_figure(series, axis, cols, ce_baseline(series[0], groups, teacher), teacher, out / figure)
                sweeps.append((axis, series, figure))
        if config.sweep == "on" and not sweeps:
            raise DistillError("--sweep on: no distilled runs that differ only in temperature or only in alpha; "
                               "pass the eval results of a sweep (make sweep) or --sweep auto")
    if teacher is not None:  # the paper's tables start with the teacher
        groups = [teacher] + [g for g in groups if g is not teacher]
    sections, numbers = paper_sections(groups, teacher, teacher_note, cols, sweeps)
    atomic_write_text(out / "report.md", markdown(runs, cols, config.title, figures, [str(p) for p in paths], sections))
    combined = {"runs": [{k: r[k] for k in ("name", "model", "parameters", "training", "tasks")} for r in runs],
                "sources": [str(p) for p in paths], **numbers}
    atomic_write_text(out / "report.json", json.dumps(combined, indent=2, sort_keys=True) + "\n")
    print((out / "report.md").read_text())
    print(f"{out}: report.md, report.json, {', '.join(figures + [f for _, _, f in sweeps]) or 'no figures'}")
    return out / "report.md"
