"""A study's run folders, read and written: whether a run is finished (`is_complete`), the
study's own record of each run (`study_run.json`), and what a finished run measured
(`metrics.csv`: per-subject values; `config.json`: the labeled subjects it trained on)."""
from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np

REQUEST_NAME = "study_run.json"
METRICS = ("dice", "hd95_mm")
MEAN_CLASS = "mean"


def read_request(run_dir: str) -> dict[str, Any] | None:
    """The study's record of a run ({"request": settings, "seconds": training time}), or None."""
    path = os.path.join(run_dir, REQUEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The per-subject, per-class rows of a run's metrics.csv (the study's metrics only)."""
    with open(os.path.join(run_dir, "metrics.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{"subject": r["subject"], "class": r["class"],
             **{m: float(r[m]) for m in METRICS}} for r in rows]


def is_complete(run_dir: str) -> bool:
    """A run is finished when its test summary and per-subject metrics are written."""
    try:
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        rows = read_metrics(run_dir)
    except (OSError, ValueError):
        return False
    return (summary.get("split") == "test" and bool(rows)
            and len({r["subject"] for r in rows}) == summary.get("num_subjects"))


def mean_dice(run_dir: str) -> float:
    return float(np.mean([r["dice"] for r in read_metrics(run_dir)]))


def run_values(run_dir: str) -> tuple[list[str], dict[str, dict[str, dict[str, float]]]]:
    """(foreground classes in file order, {class or "mean": {subject: {metric: value}}})."""
    rows = read_metrics(run_dir)
    classes = list(dict.fromkeys(r["class"] for r in rows))
    values: dict[str, dict[str, dict[str, float]]] = {c: {} for c in [*classes, MEAN_CLASS]}
    for r in rows:
        values[r["class"]][r["subject"]] = {m: r[m] for m in METRICS}
    for subject in dict.fromkeys(r["subject"] for r in rows):
        values[MEAN_CLASS][subject] = {
            m: float(np.mean([values[c][subject][m] for c in classes])) for m in METRICS}
    return classes, values


def run_labeled_subjects(run_dir: str) -> list[str] | None:
    """The labeled training subjects a run used (its config.json's split), or None if unknown."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            labeled = (json.load(f).get("split") or {}).get("labeled")
    except (OSError, ValueError):
        return None
    return sorted(map(str, labeled)) if isinstance(labeled, list) else None
