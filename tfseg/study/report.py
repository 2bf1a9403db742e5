"""A study's reports: `aggregate_study` gathers the finished runs' per-subject values into
`study.json`, `study.md` (tables, paired tests, labeled draws, runs) and `plots/*.png`, and
checks the design (`labeled_draws`: repeated draws, arms of one repeat that trained on different
subjects). The package docstring describes the statistics; `stats` computes them."""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from tfseg._files import atomic_path, write_json_atomic, write_text_atomic
from tfseg.report_html import REPORT_NAME, write_study_page
from tfseg.study.plan import (RunSpec, StudyConfig, method_fields, plan_study, split_overrides,
                              target_request)
from tfseg.study.runs import (MEAN_CLASS, METRICS, is_complete, read_request,
                              run_labeled_subjects, run_values)
from tfseg.study.stats import LOWER_IS_BETTER, describe, paired_wilcoxon

PLOTS_DIR = "plots"
TARGET_DIR = "target"  # a run's target-domain results: <run_dir>/target/{summary.json,metrics.csv}
METRIC_TITLES = {"dice": "Dice", "hd95_mm": "HD95 (mm)"}  # headings in study.md
PAIRING_KEY = ("Pairs are matched on (repeat, test subject): in repeat k both methods were trained "
               "on the same labeled draw (the repeat's split seed) and evaluated on the same test "
               "subjects; pairs are pooled over repeats.")
STD_NOTE = "population standard deviation (ddof=0) over test subjects pooled over repeats"


def aggregate_study(config: StudyConfig, specs: Sequence[RunSpec] | None = None
                    ) -> dict[str, Any]:
    """Aggregates the finished runs into study.json, study.md and plots/ (package docstring).

    Unfinished runs are listed as such and left out of the statistics.
    """
    if specs is None:
        specs = plan_study(config, split_overrides(config.overrides, method_fields(config)))
    runs = []
    for spec in specs:
        record = read_request(spec.run_dir) or {}
        seed = (record.get("request") or {}).get("split_seed", spec.seed)
        runs.append({"method": spec.method, "labeled": spec.labeled, "repeat": spec.repeat,
                     "split_seed": seed, "seed": seed,
                     "run_dir": os.path.relpath(spec.run_dir, config.out_dir),
                     "complete": is_complete(spec.run_dir), "seconds": record.get("seconds"),
                     "report": os.path.isfile(os.path.join(spec.run_dir, REPORT_NAME)),
                     "mean_dice": None, "labeled_subjects": run_labeled_subjects(spec.run_dir)})
    names, values, results, comparisons = _domain_results(config, specs, runs, "")
    target = None
    if config.target_dataset:
        t_names, _, t_results, t_comparisons = _domain_results(config, specs, runs,
                                                                 TARGET_DIR)
        target = {**target_request(config), "classes": t_names, "results": t_results,
                  "comparisons": t_comparisons,
                  "num_complete": sum(r["target_complete"] for r in runs),
                  "missing": [r["run_dir"] for r in runs
                              if r["complete"] and not r["target_complete"]]}
    seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
    result = {
        "dataset": config.dataset, "dataset_options": dict(config.dataset_options),
        "methods": list(config.methods), "arms": dict(config.arms),
        "arm_overrides": {s.method: list(s.overrides) for s in specs},
        "labeled": list(config.labeled),
        "repeats": config.repeats, "seed": config.seed, "draws": config.draws,
        "fixed_test": config.fixed_test, "preset": config.preset,
        "overrides": list(config.overrides), "steps": config.steps,
        "baseline": config.baseline, "classes": names, "pairing": PAIRING_KEY,
        "std": STD_NOTE, "test": "scipy.stats.wilcoxon(a, b), two-sided, zero_method='wilcox'",
        "min_pairs": config.min_pairs, "num_runs": len(runs),
        "num_complete": sum(r["complete"] for r in runs),
        "total_seconds": float(sum(seconds)), "runs": runs, "results": results,
        "comparisons": comparisons, "labeled_draws": labeled_draws(runs), "target": target,
    }
    os.makedirs(config.out_dir, exist_ok=True)
    result["plots"] = write_plots(result, values, config.out_dir) if names else {}
    write_json_atomic(os.path.join(config.out_dir, "study.json"), result, default=str)
    write_text_atomic(os.path.join(config.out_dir, "study.md"), study_markdown(result))
    write_study_page(result, config.out_dir)  # study.html: links every run's report.html
    return result


def _domain_results(config: StudyConfig, specs: Sequence[RunSpec], runs: list[dict],
                    domain: str) -> tuple[list[str], dict, dict, list[dict]]:
    """One domain's statistics: (classes, values, results, comparisons).

    domain: "" (the source: each run folder) or TARGET_DIR (`<run_dir>/target/`). Sets each run
    entry's "mean_dice" and "complete" (source) or "target_mean_dice" and "target_complete";
    a run whose files are missing is left out of the statistics.
    """
    prefix = f"{domain}_" if domain else ""
    classes: list[str] = []
    # values[method][N][class][metric] = {(repeat, subject): value}
    values: dict[str, dict[int, dict[str, dict[str, dict]]]] = {}
    for spec, entry in zip(specs, runs):
        folder = os.path.join(spec.run_dir, domain) if domain else spec.run_dir
        complete = is_complete(folder)
        entry[f"{prefix}complete"], entry[f"{prefix}mean_dice"] = complete, None
        if not complete:
            continue
        run_classes, run = run_values(folder)
        classes = classes or run_classes
        if run_classes != classes:
            raise ValueError(f"{folder}/metrics.csv has classes {run_classes}, other "
                             f"runs {classes}: the study mixes datasets.")
        entry[f"{prefix}mean_dice"] = float(np.mean([v["dice"]
                                                     for v in run[MEAN_CLASS].values()]))
        budget = values.setdefault(spec.method, {}).setdefault(spec.labeled, {})
        for name, subjects in run.items():
            for metric in METRICS:
                cell = budget.setdefault(name, {}).setdefault(metric, {})
                for subject, metrics in subjects.items():
                    cell[(spec.repeat, subject)] = metrics[metric]
    names = [*classes, MEAN_CLASS] if classes else []
    results = {m: {str(n): {c: {metric: describe(list(
        values.get(m, {}).get(n, {}).get(c, {}).get(metric, {}).values())) for metric in METRICS}
        for c in names} for n in config.labeled} for m in config.methods}
    for m in config.methods:  # spread over repeats of the per-run mean Dice
        for n in config.labeled:
            means = [r[f"{prefix}mean_dice"] for r in runs if r["method"] == m
                     and r["labeled"] == n and r[f"{prefix}complete"]]
            results[m][str(n)]["run_mean_dice"] = describe(means)
    comparisons = []
    for a, b in comparison_pairs(config):
        for n in config.labeled:
            for c in names:
                for metric in METRICS:
                    test = paired_wilcoxon(
                        values.get(a, {}).get(n, {}).get(c, {}).get(metric, {}),
                        values.get(b, {}).get(n, {}).get(c, {}).get(metric, {}),
                        config.min_pairs, lower_is_better=metric in LOWER_IS_BETTER)
                    comparisons.append({"a": a, "b": b, "labeled": n, "class": c,
                                        "metric": metric, **test})
    return names, values, results, comparisons


def comparison_pairs(config: StudyConfig) -> list[tuple[str, str]]:
    """Each method against the baseline (if in the study), then the named pairs, no repeats."""
    pairs = []
    if config.baseline in config.methods:
        pairs += [(m, config.baseline) for m in config.methods if m != config.baseline]
    for pair in config.compare:
        if pair not in pairs and pair[::-1] not in pairs:
            pairs.append(tuple(pair))
    return pairs


def labeled_draws(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The labeled subjects of each (budget, repeat), and what breaks the study's design.

    Returns {"draws": [{"labeled", "repeat", "seed", "subjects"}], "mismatches": [...],
    "duplicates": [...]}: a mismatch is a (budget, repeat) whose runs did not all train on the same
    subjects (their results are then not paired); a duplicate is a set of repeats of one budget
    that drew the same labeled subjects (the study has fewer distinct labeled draws than repeats).
    """
    first: dict[tuple[int, int], Mapping[str, Any]] = {}  # (budget, repeat) -> its first run
    mismatches = []
    for r in runs:
        if r.get("labeled_subjects") is None:
            continue
        ref = first.setdefault((r["labeled"], r["repeat"]), r)
        if ref["labeled_subjects"] != r["labeled_subjects"]:
            mismatches.append({"labeled": r["labeled"], "repeat": r["repeat"],
                               "methods": [ref["method"], r["method"]],
                               "subjects": [ref["labeled_subjects"], r["labeled_subjects"]]})
    draws = [{"labeled": r["labeled"], "repeat": r["repeat"], "seed": r["split_seed"],
              "subjects": r["labeled_subjects"]} for _, r in sorted(first.items())]
    groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
    for d in draws:
        groups.setdefault((d["labeled"], tuple(d["subjects"])), []).append(d["repeat"])
    duplicates = [{"labeled": n, "repeats": repeats, "subjects": list(subjects)}
                  for (n, subjects), repeats in groups.items() if len(repeats) > 1]
    return {"draws": draws, "mismatches": mismatches, "duplicates": duplicates}


# --------------------------------------------------------------------------- study.md
def format_duration(seconds: float) -> str:
    """h:mm:ss."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _cell(stats: Mapping[str, Any], digits: int) -> str:
    if not stats["n"]:
        return "—"
    return (f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} "
            f"({stats['median']:.{digits}f})")


def study_markdown(result: Mapping[str, Any]) -> str:
    """study.md: settings, tables per budget, the tests, the target domain's (if any), the
    plots and the runs."""
    methods = result["methods"]
    target = result.get("target")
    lines = [f"# Study: {result['dataset']}"
             + (f" → target {target['dataset']}" if target else "")
             + f" — {', '.join(methods)}", "",
             f"- Runs finished: {result['num_complete']} / {result['num_runs']} "
             f"({len(methods)} methods × budgets {', '.join(map(str, result['labeled']))} "
             f"labeled × {result['repeats']} repeats); training time (sum over runs, wall "
             f"clock): {format_duration(result['total_seconds'])}",
             f"- Preset: {result['preset'] or 'none'}; overrides: "
             f"{', '.join(result['overrides']) or 'none'}; steps: {result['steps'] or 'default'};"
             f" repeat k uses split seed and training seed "
             + (f"{result['seed']} + k." if result.get("draws", "independent") == "independent"
                else f"s_k: {result['seed']}, then the next seed whose labeled subjects no "
                     "earlier repeat drew (see Labeled draws).")
             + (f" Test and validation subjects are the same in every repeat (drawn with seed "
                f"{result['seed']}, --fixed_test)." if result.get("fixed_test") else
                " Each repeat's seed draws its own test and validation subjects too."),
             f"- Cells: mean ± std (median) over test subjects pooled over repeats "
             f"({result['std']}); \"{MEAN_CLASS}\" = each subject's mean over the foreground "
             "classes. Per-subject values from each run's metrics.csv (test split, original "
             "geometry; HD95 in mm).", ""]
    arms, arm_overrides = result.get("arms") or {}, result.get("arm_overrides") or {}
    if any(arms.get(m, m) != m or arm_overrides.get(m) for m in methods):
        lines += ["| Arm | method | settings |", "|---|---|---|"]
        lines += [f"| {m} | {arms.get(m, m)} | {', '.join(arm_overrides.get(m, [])) or '—'} |"
                  for m in methods]
        lines.append("")
    lines += _domain_markdown(result, result, "##")
    if target:
        lines += _target_markdown(result, target)
    plots = result.get("plots") or {}
    if plots:
        lines += ["## Plots", "", f"![Dice vs labeled subjects]({plots['label_efficiency']})", ""]
        for n, path in plots.get("boxplots", {}).items():
            lines += [f"![Dice per class, {n} labeled]({path})", ""]
    lines += _draws_markdown(result.get("labeled_draws") or {})
    lines += ["## Runs", "", "| Method | labeled | repeat | seed | finished | mean Dice | "
              + ("target mean Dice | " if target else "") + "seconds | folder |",
              "|---" * (8 + bool(target)) + "|"]
    for r in result["runs"]:
        dice = "—" if r["mean_dice"] is None else f"{r['mean_dice']:.4f}"
        if target:
            dice += (" | —" if r.get("target_mean_dice") is None
                     else f" | {r['target_mean_dice']:.4f}")
        seconds = "—" if r["seconds"] is None else f"{r['seconds']:.0f}"
        folder = (f"[{r['run_dir']}]({r['run_dir']}/{REPORT_NAME})" if r.get("report")
                  else r["run_dir"])  # linked to the run's page when it has one
        lines.append(f"| {r['method']} | {r['labeled']} | {r['repeat']} | {r['seed']} | "
                     f"{'yes' if r['complete'] else 'no'} | {dice} | {seconds} | {folder} |")
    return "\n".join(lines) + "\n"


def _domain_markdown(result: Mapping[str, Any], domain: Mapping[str, Any],
                     level: str) -> list[str]:
    """The tables per budget and the paired tests of one domain (`domain`: its "classes",
    "results" and "comparisons"), under headings of `level` ("##" or deeper)."""
    names, methods = domain["classes"], result["methods"]
    lines: list[str] = []
    for metric, digits in (("dice", 3), ("hd95_mm", 2)):
        lines += [f"{level} {METRIC_TITLES[metric]}", ""]
        for n in result["labeled"]:
            per_run = metric == "dice"  # plus the spread of the runs' mean Dice over repeats
            lines += [f"{level}# {n} labeled", "",
                      "| Method | n | " + " | ".join(names)
                      + (" | runs: mean Dice over repeats |" if per_run else " |"),
                      "|---" * (len(names) + 2 + per_run) + "|"]
            for m in methods:
                cells = domain["results"][m][str(n)]
                count = cells[names[0]][metric]["n"] if names else 0
                runs = cells["run_mean_dice"]
                extra = (f" {_cell(runs, 3)} ({runs['n']} runs) |" if per_run and runs["n"]
                         else " — |" if per_run else "")
                lines.append(f"| {m} | {count} | "
                             + " | ".join(_cell(cells[c][metric], digits) for c in names)
                             + " |" + extra)
            lines.append("")
    lines += [f"{level} Paired Wilcoxon signed-rank tests", "",
              f"{result['pairing']} Test: {result['test']}; \"n/a\" when fewer than "
              f"{result['min_pairs']} pairs or all differences are zero. With fewer than 6 "
              "non-zero differences no two-sided exact p-value can be below 0.05. \"A better / "
              "B better\" counts the pairs where that method is better: higher Dice, lower "
              "HD95.", ""]
    for metric, digits in (("dice", 4), ("hd95_mm", 2)):
        tests = [t for t in domain["comparisons"] if t["metric"] == metric]
        if not tests:
            continue
        lines += [f"{level}# {METRIC_TITLES[metric]}", "",
                  "| A vs B | labeled | class | pairs | mean Δ (A−B) | median Δ | A better / "
                  "B better | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in tests:
            delta = ("—" if t["mean_difference"] is None
                     else f"{t['mean_difference']:+.{digits}f}")
            median = ("—" if t["median_difference"] is None
                      else f"{t['median_difference']:+.{digits}f}")
            p = f"{t['p_value']:.4g}" if t["p_value"] is not None else t["note"]
            lines.append(f"| {t['a']} vs {t['b']} | {t['labeled']} | {t['class']} | "
                         f"{t['n_pairs']} | {delta} | {median} | {t['a_better']} / "
                         f"{t['b_better']} | {p} |")
        lines.append("")
    if not domain["comparisons"]:
        lines += [f"No comparison: the baseline {result['baseline']!r} is not among the "
                  "methods and no --compare pair was given.", ""]
    return lines


def _target_markdown(result: Mapping[str, Any], target: Mapping[str, Any]) -> list[str]:
    """The "Target domain: <dataset>" section: the target test results of every run."""
    options = ", ".join(f"{k}={v}" for k, v in target["dataset_options"].items())
    lines = [f"## Target domain: {target['dataset']}", "",
             f"- Dataset {target['dataset']}" + (f" ({options})" if options else "")
             + (f", data {target['data_dir']}" if target.get("data_dir") else "")
             + (f", records {target['records_dir']}" if target.get("records_dir") else "")
             + "; each run's target split drawn with its repeat's split seed.",
             f"- Runs with target results: {target['num_complete']} / {result['num_runs']}. "
             "Cells and tests as above, from each run's target/metrics.csv (the target "
             "split's test subjects).", ""]
    if target.get("missing"):
        lines += ["**Missing:** finished runs without target results (no target/summary.json "
                  "and target/metrics.csv), left out of this section: "
                  + ", ".join(target["missing"]) + ".", ""]
    if not target["classes"]:
        return lines + ["No run has target results yet.", ""]
    return lines + _domain_markdown(result, target, "###")


def _draws_markdown(info: Mapping[str, Any]) -> list[str]:
    """The "Labeled draws" section: subjects per (budget, repeat) and the design warnings."""
    if not info.get("draws"):
        return []
    lines = ["## Labeled draws", "", "| labeled | repeat | split seed | labeled subjects |",
             "|---|---|---|---|"]
    lines += [f"| {d['labeled']} | {d['repeat']} | {d['seed']} | {', '.join(d['subjects'])} |"
              for d in info["draws"]]
    lines.append("")
    for d in info.get("duplicates", []):
        lines.append(f"**Warning:** with {d['labeled']} labeled, repeats "
                     f"{', '.join(map(str, d['repeats']))} drew the same labeled subjects "
                     f"({', '.join(d['subjects'])}); they differ in seed, validation and test "
                     "subjects, but the study has fewer distinct labeled draws than repeats.")
    for m in info.get("mismatches", []):
        lines.append(f"**Warning:** with {m['labeled']} labeled, repeat {m['repeat']}: "
                     f"{m['methods'][0]} trained on {', '.join(m['subjects'][0])} but "
                     f"{m['methods'][1]} on {', '.join(m['subjects'][1])}; their results are not"
                     " paired (were the records or the dataset changed between runs?).")
    if info.get("duplicates") or info.get("mismatches"):
        lines.append("")
    return lines


def write_plots(result: Mapping[str, Any], values, out_dir: str) -> dict[str, Any]:
    """Label-efficiency curves and per-budget box plots of Dice; returns relative paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, methods, budgets = result["classes"], result["methods"], result["labeled"]
    folder = os.path.join(out_dir, PLOTS_DIR)
    os.makedirs(folder, exist_ok=True)
    paths: dict[str, Any] = {"boxplots": {}}

    # 1. Dice vs number of labeled subjects: mean ± std per method, one panel per class.
    figure = Figure(figsize=(3.2 * len(names), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    for axis, name in zip(axes, names):
        for m in methods:
            stats = [result["results"][m][str(n)][name]["dice"] for n in budgets]
            points = [(n, s["mean"], s["std"]) for n, s in zip(budgets, stats) if s["n"]]
            if not points:
                continue
            x, mean, std = (np.array(v, dtype=float) for v in zip(*points))
            line = axis.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=m)
            axis.fill_between(x, mean - std, mean + std, alpha=0.15, color=line[0].get_color())
        axis.set(title=name, xlabel="labeled subjects", ylim=(0, 1), xticks=budgets)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("Dice (mean ± std)")
    axes[-1].legend(fontsize="small")
    paths["label_efficiency"] = _save_figure(figure, folder, "label_efficiency.png", out_dir)

    # 2. Box plots per class and method at each budget.
    for n in budgets:
        figure = Figure(figsize=(max(3.2, 0.9 * len(methods) + 1) * len(names), 3.4),
                        layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, len(names), squeeze=False)[0]
        for axis, name in zip(axes, names):
            data = [list(values.get(m, {}).get(n, {}).get(name, {}).get("dice", {}).values())
                    for m in methods]
            axis.boxplot([d if d else [math.nan] for d in data], tick_labels=methods)
            axis.set(title=f"{name}, {n} labeled", ylim=(0, 1))
            axis.tick_params(axis="x", labelrotation=30)
            axis.grid(alpha=0.3, axis="y")
        axes[0].set_ylabel("Dice per test subject")
        paths["boxplots"][str(n)] = _save_figure(figure, folder, f"boxplot_l{n}.png", out_dir)
    return paths


def _save_figure(figure, folder: str, name: str, out_dir: str) -> str:
    """Saves a PNG atomically (`tfseg._files.atomic_path`) with the usual permissions."""
    with atomic_path(os.path.join(folder, name)) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    return os.path.relpath(os.path.join(folder, name), out_dir)
