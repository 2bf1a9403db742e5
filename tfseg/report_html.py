"""One page per run (`<run_dir>/report.html`) and per study (`<study>/study.html`), readable
offline in any browser: no server, no network, no external CSS, scripts or fonts.

The run page shows, from what the run folder holds:
- the configuration (config.json): method, preset, dataset, split sizes, steps, checkpoint
  policy, versions; the method's settings in a collapsible table;
- the training curves (train_log.csv), drawn with matplotlib and embedded as a base64 PNG;
- the evaluation (summary.json): mean ± std (median) per class or region, then every subject
  sorted by mean Dice, worst first, linked to its montage;
- the montages (`overlays/*.png`, `tfseg.visualize`) shown in the page by relative path, worst
  first, and the same for the target domain (`target/`) when the run has one.

Everything the page references is a file inside the run folder (checked when written), or an
embedded `data:` image. The study page links every run's page and shows the study's plots.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from typing import Any, Mapping, Sequence

from tfseg._files import read_json, write_text_atomic
from tfseg.visualize import OVERLAYS_DIR, find_overlay

__all__ = ["REPORT_NAME", "STUDY_PAGE_NAME", "write_run_report", "run_report_html",
           "training_curves_png", "write_study_page"]

REPORT_NAME = "report.html"
STUDY_PAGE_NAME = "study.html"
TARGET_DIR = "target"
_METRICS = (("dice", "Dice", 3), ("iou", "IoU", 3), ("hd95_mm", "HD95 (mm)", 2),
            ("asd_mm", "ASD (mm)", 2), ("precision", "Precision", 3), ("recall", "Recall", 3))
_STYLE = """
body{font-family:sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
.note{color:#666;font-size:90%}nav a{margin-right:1em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _read_optional_json(path: str) -> Any:
    return read_json(path) if os.path.isfile(path) else None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless `raw` (cells already HTML)."""
    cell = (lambda v: str(v)) if raw else _e
    return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                      for row in rows) + "</table>")


def _stat(stats: Mapping[str, float] | None, digits: int) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    return (f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} "
            f"({stats['median']:.{digits}f})")


# --------------------------------------------------------------------------- training curves
def _read_log(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def training_curves_png(rows: Sequence[Mapping[str, str]], names: Sequence[str]) -> bytes:
    """PNG of the training log: tracked loss terms, validation Dice, learning rates vs step.

    A blank cell (a term a stage does not compute) is a gap; dashed lines mark stage changes.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = [c for c in rows[0] if c not in ("stage", "step", "epoch", "elapsed_s")]
    dice = ["val_mean_dice"] + [f"val_dice_{n}" for n in names]
    dice = [c for c in dice if c in columns]
    rates = [c for c in columns if c.startswith("lr_")]
    losses = [c for c in columns if c not in dice and c not in rates]
    groups = [(title, cols) for title, cols in (("loss terms", losses),
                                                ("validation Dice", dice),
                                                ("learning rate", rates)) if cols]
    steps = [_number(r.get("step")) for r in rows]
    figure = Figure(figsize=(4.2 * len(groups), 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(groups), squeeze=False)[0]
    changes = [steps[i - 1] for i in range(1, len(rows))
               if rows[i].get("stage") != rows[i - 1].get("stage")]
    for axis, (title, cols) in zip(axes, groups):
        for column in cols:
            values = [_number(r.get(column)) for r in rows]
            axis.plot(steps, values, marker="o", markersize=3, label=column,
                      lw=2.2 if column == "val_mean_dice" else 1.2)
        positive = all(v > 0 for c in cols for v in (_number(r.get(c)) for r in rows)
                       if not math.isnan(v))
        if title != "validation Dice" and positive:
            axis.set_yscale("log")
        if title == "validation Dice":
            axis.set_ylim(0, 1)
        for step in changes:
            axis.axvline(step, color="grey", ls="--", lw=0.8)
        axis.set(title=title, xlabel="step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


# --------------------------------------------------------------------------- run page
def _config_section(config: Mapping[str, Any]) -> str:
    train = config.get("train") or {}
    split = config.get("split") or {}
    sizes = ", ".join(f"{k} {len(split[k])}" for k in ("labeled", "unlabeled", "val", "test")
                      if isinstance(split.get(k), list))
    options = ", ".join(f"{k}={v}" for k, v in (config.get("dataset_options") or {}).items())
    method_config = config.get("method_config") or {}
    steps = sum(int(s.get("steps") or 0) for s in config.get("stages") or []) or \
        method_config.get("steps")
    target = config.get("target")
    rows = [("method", config.get("method")), ("preset", config.get("preset") or "none"),
            ("overrides", ", ".join(train.get("overrides") or []) or "none"),
            ("dataset", f"{config.get('dataset')}" + (f" ({options})" if options else "")),
            ("target domain", target.get("dataset") if target else "none"),
            ("split", f"{split.get('name', '')} seed {split.get('seed')}: {sizes}"),
            ("labeled subjects", ", ".join(split.get("labeled") or [])),
            ("steps", steps), ("training seed", train.get("seed", train.get("split_seed"))),
            ("checkpoint", config.get("checkpoint_policy")),
            ("pipeline", ", ".join(f"{k}={v}" for k, v in (config.get("pipeline") or {}).items())),
            ("git commit", config.get("git_commit")),
            ("versions", f"tfseg {config.get('tfseg_version')}, TensorFlow "
                         f"{config.get('tensorflow_version')}, Keras {config.get('keras_version')}")]
    settings = _table(["setting", "value"], [(k, v) for k, v in method_config.items()])
    return ("<h2 id='config'>Configuration</h2>" + _table(["setting", "value"], rows)
            + f"<details><summary>Method settings ({len(method_config)})</summary>{settings}"
            "</details><p class='note'>Everything: <a href='config.json'>config.json</a></p>")


def _evaluation_section(run_dir: str, folder: str, summary: Mapping[str, Any], title: str,
                        anchor: str) -> str:
    """Per-class table, per-subject table (worst first) and the montages of one evaluation."""
    prefix = os.path.relpath(folder, run_dir).replace(os.sep, "/")
    prefix = "" if prefix == "." else prefix + "/"
    names = list(summary.get("classes") or {})
    parts = [f"<h2 id='{anchor}'>{_e(title)} — split {_e(summary.get('split'))}, "
             f"{summary.get('num_subjects')} subjects</h2>",
             f"<p>Mean Dice over {'regions' if summary.get('targets') == 'regions' else 'foreground classes'}"
             f": <b>{summary.get('mean_dice', math.nan):.3f}</b>; checkpoint "
             f"{_e(summary.get('checkpoint'))}; flip TTA {'on' if summary.get('flip_tta') else 'off'}"
             ". Cells: mean ± std (median) over subjects; original geometry, distances in mm. "
             f"Files: <a href='{prefix}summary.md'>summary.md</a>, "
             f"<a href='{prefix}metrics.csv'>metrics.csv</a>.</p>"]
    rows = [[name] + [_stat(stats.get(key), digits) for key, _, digits in _METRICS]
            for name, stats in (summary.get("classes") or {}).items()]
    overall = summary.get("overall") or {}
    rows.append(["mean of classes"] + [_stat(overall.get(key), digits)
                                       for key, _, digits in _METRICS])
    parts.append(_table(["class"] + [label for _, label, _ in _METRICS], rows))

    subjects = summary.get("subjects") or {}
    order = sorted(subjects, key=lambda s: (_mean_dice(subjects[s], names), s))
    table, figures = [], []
    for rank, subject in enumerate(order, 1):
        record = subjects[subject]
        overlay = find_overlay(os.path.join(folder, OVERLAYS_DIR), subject)
        link = f"{prefix}{OVERLAYS_DIR}/{os.path.basename(overlay)}" if overlay else None
        prediction = os.path.join(folder, "predictions", f"{subject}_seg.nii.gz")
        cells = [str(rank),
                 f"<a href='#{anchor}-{_e(subject)}'>{_e(subject)}</a>" if link else _e(subject),
                 f"{_mean_dice(record, names):.3f}"]
        cells += [f"{record[n]['dice']:.3f}" if n in record else "n/a" for n in names]
        cells.append(f"{record['miou']:.3f}" if record.get("miou") is not None else "n/a")
        cells.append(f"<a href='{prefix}predictions/{_e(subject)}_seg.nii.gz'>NIfTI</a>"
                     if os.path.isfile(prediction) else "—")
        table.append(cells)
        if link:
            figures.append(f"<figure id='{anchor}-{_e(subject)}'><a href='{_e(link)}'>"
                           f"<img src='{_e(link)}' alt='{_e(subject)} overlay' loading='lazy'>"
                           f"</a><figcaption>{rank}. {_e(subject)} — mean Dice "
                           f"{_mean_dice(record, names):.3f}</figcaption></figure>")
    if order:  # the spread over subjects, per class
        table.append(["", "<b>mean ± std</b>",
                      _mean_std([_mean_dice(subjects[s], names) for s in order])]
                     + [_mean_std([subjects[s][n]["dice"] for s in order if n in subjects[s]])
                        for n in names]
                     + [_mean_std([subjects[s]["miou"] for s in order
                                   if subjects[s].get("miou") is not None]), ""])
    parts.append("<h3>Subjects, worst first</h3>" + _table(
        ["#", "subject", "mean Dice", *[f"Dice {n}" for n in names], "mIoU", "prediction"],
        table, raw=True))
    if figures:
        parts.append("<h3>Montages, worst first</h3><p class='note'>Prediction: solid line on "
                     "the inner edge of the predicted mask; ground truth: dotted line on the "
                     "outer edge of the true mask; one colour per class or region.</p>"
                     + "".join(figures))
    else:
        parts.append("<p class='note'>No montages (evaluated with --nooverlays).</p>")
    return "".join(parts)


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))  # ddof=0, as summary
    return f"{mean:.3f} ± {std:.3f}"


def _mean_dice(record: Mapping[str, Any], names: Sequence[str]) -> float:
    values = [record[n]["dice"] for n in names if isinstance(record.get(n), Mapping)]
    return sum(values) / len(values) if values else math.nan


def run_report_html(run_dir: str) -> str:
    """The run page as a string (see the module docstring)."""
    config = _read_optional_json(os.path.join(run_dir, "config.json")) or {}
    spec = config.get("data_spec") or {}
    names = spec.get("region_names") or (spec.get("class_names") or [])[1:]
    title = " / ".join(str(config[k]) for k in ("dataset", "method") if config.get(k)) or \
        os.path.basename(os.path.abspath(run_dir))
    sections = [_config_section(config)] if config else []
    log = _read_log(os.path.join(run_dir, "train_log.csv"))
    if log:
        png = base64.b64encode(training_curves_png(log, names)).decode("ascii")
        last = log[-1]
        sections.append("<h2 id='training'>Training</h2>"
                        f"<img alt='training curves' src='data:image/png;base64,{png}'>"
                        f"<p class='note'>{len(log)} validation rounds; last: step "
                        f"{_e(last.get('step'))}, {_e(last.get('elapsed_s'))} s. Data: "
                        "<a href='train_log.csv'>train_log.csv</a>.</p>")
    nav = [("config", "Configuration")] if config else []
    nav += [("training", "Training")] if log else []
    for folder, label, anchor in ((run_dir, "Evaluation", "evaluation"),
                                  (os.path.join(run_dir, TARGET_DIR), "Target domain",
                                   "target")):
        summary = _read_optional_json(os.path.join(folder, "summary.json"))
        if summary:
            sections.append(_evaluation_section(run_dir, folder, summary, label, anchor))
            nav.append((anchor, label))
    links = "".join(f"<a href='#{a}'>{_e(t)}</a>" for a, t in nav)
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(title)} — tfseg run</title><style>{_STYLE}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class='note'>Run folder {_e(os.path.abspath(run_dir))}</p>"
            f"<nav>{links}</nav>" + "".join(sections) + "</body></html>\n")


def write_run_report(run_dir: str) -> str:
    """Writes `<run_dir>/report.html` (atomic); returns its path."""
    path = os.path.join(run_dir, REPORT_NAME)
    write_text_atomic(path, run_report_html(run_dir))
    return path


# --------------------------------------------------------------------------- study page
def write_study_page(result: Mapping[str, Any], out_dir: str) -> str:
    """Writes `<out_dir>/study.html`: the Dice table per budget, the study's plots and every
    run with a link to its report.html; returns the path."""
    names = result.get("classes") or []
    parts = [f"<h1>Study: {_e(result.get('dataset'))} — {_e(', '.join(result['methods']))}</h1>",
             f"<p>Runs finished: {result.get('num_complete')} / {result.get('num_runs')}. "
             "Cells: mean ± std (median) Dice over test subjects pooled over repeats. Tables, "
             "tests and settings: <a href='study.md'>study.md</a>, "
             "<a href='study.json'>study.json</a>.</p>"]
    for n in result.get("labeled") or []:
        rows = [[m] + [_stat_n(result["results"][m][str(n)][c]["dice"]) for c in names]
                for m in result["methods"]]
        parts.append(f"<h2>{n} labeled</h2>" + _table(["method", *names], rows))
    plots = result.get("plots") or {}
    images = ([plots["label_efficiency"]] if plots.get("label_efficiency") else []) + \
        list((plots.get("boxplots") or {}).values())
    if images:
        parts.append("<h2>Plots</h2>" + "".join(
            f"<figure><img src='{_e(p)}' alt='{_e(p)}'></figure>" for p in images))
    rows = []
    for r in result.get("runs") or []:
        page = os.path.join(out_dir, r["run_dir"], REPORT_NAME)
        folder = r["run_dir"].replace(os.sep, "/")
        rows.append([_e(r["method"]), str(r["labeled"]), str(r["repeat"]), str(r["seed"]),
                     "yes" if r["complete"] else "no",
                     "—" if r.get("mean_dice") is None else f"{r['mean_dice']:.4f}",
                     f"<a href='{_e(folder)}/{REPORT_NAME}'>{_e(folder)}</a>"
                     if os.path.isfile(page) else _e(folder)])
    parts.append("<h2>Runs</h2>" + _table(
        ["method", "labeled", "repeat", "seed", "finished", "mean Dice", "run page"], rows,
        raw=True))
    path = os.path.join(out_dir, STUDY_PAGE_NAME)
    write_text_atomic(path, "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                      f"<title>Study {_e(result.get('dataset'))}</title><style>{_STYLE}</style>"
                      "</head><body>" + "".join(parts) + "</body></html>\n")
    return path


def _stat_n(stats: Mapping[str, Any]) -> str:
    return "—" if not stats.get("n") else _stat(stats, 3)
