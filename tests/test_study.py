"""tfseg.study / launch.study: overrides, planning, aggregation and Wilcoxon tests on fabricated
run folders (numbers recomputed here independently), resume, plots, errors; one real end-to-end
study on synthetic_cardiac (slow: killed after its first run, then resumed)."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats

from launch import study as study_cli
from tfseg import study
from tfseg.data import splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("rv", "myo", "lv")


def _config(tmp_path, **changes):
    values = dict(dataset="synthetic_cardiac", methods=("supervised", "self_training"),
                  labeled=(1, 3), repeats=2, out_dir=str(tmp_path / "study"))
    values.update(changes)
    return study.StudyConfig(**values)


def write_records(folder, labeled=20, image_only=2):
    """A records folder whose manifest.json lists patients p00.. (labeled) and u00.. (images)."""
    subjects = {f"p{i:02d}": {"patient_id": f"p{i:02d}", "labeled": True} for i in range(labeled)}
    subjects.update({f"u{i:02d}": {"patient_id": f"u{i:02d}", "labeled": False}
                     for i in range(image_only)})
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({"subjects": subjects}, f)
    return str(folder)


def fabricate_run(config, spec, dice, hd95=None, labeled_subjects=None, records_dir=None):
    """Writes a finished run: metrics.csv, summary.json (test split) and the study request.

    dice / hd95: {subject: [value per class]}. labeled_subjects / records_dir: also writes
    config.json with that split and records folder (by default the split launch.train would
    draw from that folder's manifest).
    """
    os.makedirs(spec.run_dir, exist_ok=True)
    if records_dir is not None and labeled_subjects is None:
        pools = splits.patient_pools(_manifest(records_dir))
        labeled_subjects = splits.draw_split(*pools, spec.labeled, spec.seed, config.num_val,
                                             config.num_test).labeled
    if labeled_subjects is not None:
        with open(os.path.join(spec.run_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump({"split": {"labeled": list(labeled_subjects), "val": ["v"]},
                       "records_dir": records_dir}, f)
    hd95 = hd95 or {s: [10.0 + i for i in range(len(CLASSES))] for s in dice}
    with open(os.path.join(spec.run_dir, "metrics.csv"), "w", newline="",
              encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "class", "dice", "iou", "hd95_mm", "asd_mm", "precision",
                         "recall"])
        for subject, values in dice.items():
            for c, name in enumerate(CLASSES):
                writer.writerow([subject, name, f"{values[c]:.6f}", "0.5",
                                 f"{hd95[subject][c]:.6f}", "1.0", "0.5", "0.5"])
    with open(os.path.join(spec.run_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"split": "test", "num_subjects": len(dice)}, f)
    with open(os.path.join(spec.run_dir, study.REQUEST_NAME), "w", encoding="utf-8") as f:
        json.dump({"request": spec.request(config), "seconds": 10.0}, f)


def _manifest(records_dir):
    with open(os.path.join(records_dir, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def _records(folder, calls=None):
    """Stands in for `study.resolve_records` (the launch.preprocess child): returns `folder`."""
    def records(config, log_path):
        if calls is not None:
            calls.append(log_path)
        return str(folder)
    return records


# --------------------------------------------------------------------------- overrides and plan
def test_split_overrides_global_and_per_method():
    fields = {"supervised": ["filters", "augment", "steps"],
              "self_training": ["filters", "augment", "steps", "rounds"]}
    result = study.split_overrides(
        ["filters=4,8", "rounds=3", "supervised:augment=affine", "self_training: steps = 5"],
        fields)
    assert result == {"supervised": ("filters=4,8", "augment=affine"),
                      "self_training": ("filters=4,8", "rounds=3", "steps= 5")}
    with pytest.raises(ValueError, match=r"none of the study's methods .* has a setting 'nope'"):
        study.split_overrides(["nope=1"], fields)
    with pytest.raises(ValueError, match=r"method 'task_aug' is not in the study"):
        study.split_overrides(["task_aug:rounds=1"], fields)
    with pytest.raises(ValueError, match="expected name=value or method:name=value"):
        study.split_overrides(["filters"], fields)


def test_plan_pairs_seeds_across_methods_and_builds_train_commands(tmp_path):
    config = _config(tmp_path, seed=10, preset="quick", steps=4, n4=False, num_test=2)
    specs = study.plan_runs(config, {"supervised": ("augment=affine",), "self_training": ()})
    assert [(s.labeled, s.repeat, s.method) for s in specs] == [
        (1, 0, "supervised"), (1, 0, "self_training"), (1, 1, "supervised"),
        (1, 1, "self_training"), (3, 0, "supervised"), (3, 0, "self_training"),
        (3, 1, "supervised"), (3, 1, "self_training")]
    assert [s.seed for s in specs] == [10, 10, 11, 11, 10, 10, 11, 11]
    assert specs[2].run_dir == os.path.join(config.out_dir, "runs", "supervised", "l1", "r1")
    argv = specs[2].train_argv(config)
    assert argv[:3] == [sys.executable, "-m", "launch.train"]
    for flag in ("--method=supervised", "--labeled=1", "--split_seed=11", "--seed=11",
                 "--non4", "--noexport", "--preset=quick", "--steps=4", "--num_test=2",
                 "--set=augment=affine", f"--run_dir={os.path.abspath(specs[2].run_dir)}"):
        assert flag in argv, flag
    assert not any(a.startswith("--set") for a in specs[3].train_argv(config))


def test_fixed_test_gives_every_repeat_the_base_seed_test_set(tmp_path):
    pools = splits.patient_pools(_manifest(write_records(tmp_path / "records")))
    config = _config(tmp_path, labeled=(1,), repeats=3, seed=4, fixed_test=True)
    assert config.test_seed == 4
    seeds = study.repeat_seeds(config, pools)
    drawn = [splits.draw_split(*pools, 1, seed, test_seed=4) for seed in seeds]
    assert len({d.test for d in drawn}) == 1 and len({d.labeled for d in drawn}) == 3
    spec = dataclasses.replace(study.plan_runs(config, {"supervised": ()})[1], seed=seeds[1])
    argv = spec.train_argv(config)
    assert "--test_seed=4" in argv and f"--split_seed={seeds[1]}" in argv
    assert spec.request(config)["test_seed"] == 4
    # Without it the request and the command are as before (old studies resume unchanged).
    plain = dataclasses.replace(config, fixed_test=False)
    assert "test_seed" not in spec.request(plain)
    assert not any(a.startswith("--test_seed") for a in spec.train_argv(plain))


def test_check_config_rejects_unknown_names_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown method\(s\) 'nope'.*Available: .*supervised"):
        study.check_config(_config(tmp_path, methods=("supervised", "nope")))
    with pytest.raises(ValueError, match=r"Unknown dataset 'nope'.*synthetic_cardiac"):
        study.check_config(_config(tmp_path, dataset="nope"))
    with pytest.raises(ValueError, match=r"Method 'supervised': Unknown preset 'fast'"):
        study.check_config(_config(tmp_path, preset="fast"))
    with pytest.raises(ValueError, match=r"Method 'supervised'.*no field 'rounds'"):
        study.check_config(_config(tmp_path, overrides=("supervised:rounds=2",)))
    with pytest.raises(ValueError, match=r"rounds.*expected an integer"):
        study.check_config(_config(tmp_path, overrides=("rounds=two",)))
    assert study.check_config(_config(tmp_path, overrides=("rounds=1", "filters=4,8"))) == {
        "supervised": ("filters=4,8",), "self_training": ("rounds=1", "filters=4,8")}
    for bad, message in ((dict(labeled=(0,)), "labeled"), (dict(repeats=0), "repeats"),
                         (dict(methods=("supervised", "supervised")), "twice"),
                         (dict(compare=(("supervised", "task_aug"),)), "--compare pair")):
        with pytest.raises(ValueError, match=message):
            _config(tmp_path, **bad)



def test_arms_run_one_method_under_two_labels_with_their_own_settings(tmp_path):
    config = _config(tmp_path, methods=("supervised", "RDRI=supervised", "indep=self_training"),
                     labeled=(1,), repeats=1, compare=(("indep", "RDRI"),), baseline="RDRI")
    assert config.methods == ("supervised", "RDRI", "indep")
    assert config.arms == {"supervised": "supervised", "RDRI": "supervised",
                           "indep": "self_training"}
    per_arm = study.check_config(dataclasses.replace(config, overrides=(
        "filters=4,8", "RDRI:augment=affine+elastic+intensity", "indep:rounds=1")))
    assert per_arm == {"supervised": ("filters=4,8",),
                       "RDRI": ("filters=4,8", "augment=affine+elastic+intensity"),
                       "indep": ("filters=4,8", "rounds=1")}
    specs = study.plan_runs(config, per_arm)
    rdri = specs[1]
    assert (rdri.method, rdri.module) == ("RDRI", "supervised")
    assert rdri.run_dir == os.path.join(config.out_dir, "runs", "RDRI", "l1", "r0")
    argv = rdri.train_argv(config)
    assert "--method=supervised" in argv and "--set=augment=affine+elastic+intensity" in argv
    assert rdri.request(config)["method"] == "RDRI=supervised"
    assert specs[0].request(config)["method"] == "supervised"  # plain arms: records unchanged
    assert study.comparison_pairs(config) == [("supervised", "RDRI"), ("indep", "RDRI")]
    # A run folder of another arm (same label, other method) is refused on resume.
    fabricate_run(config, rdri, {"s1": [0.5, 0.5, 0.5]})
    other = _config(tmp_path, methods=("RDRI=self_training",), labeled=(1,), repeats=1)
    with pytest.raises(ValueError, match="differs in: method"):
        study.check_existing(other, study.plan_runs(other, {"RDRI": ()}))
    # The report names each arm's method and settings.
    for spec in specs[::2]:
        fabricate_run(config, spec, {f"s{i}": [0.1 * i, 0.5, 0.6] for i in range(1, 7)})
    result = study.aggregate_study(config, specs)
    assert result["arms"]["RDRI"] == "supervised"
    assert result["results"]["RDRI"]["1"]["rv"]["dice"]["n"] == 1
    text = open(os.path.join(config.out_dir, "study.md"), encoding="utf-8").read()
    assert "| RDRI | supervised | filters=4,8, augment=affine+elastic+intensity |" in text
    for bad in ("=supervised", "a b=supervised", "RDRI=", "../x=supervised"):
        with pytest.raises(ValueError, match="label=method"):
            _config(tmp_path, methods=(bad,))
    with pytest.raises(ValueError, match="twice"):
        _config(tmp_path, methods=("supervised", "supervised=supervised"))
    with pytest.raises(ValueError, match=r"Unknown method\(s\) 'nope'"):
        study.check_config(_config(tmp_path, methods=("x=nope",)))


# --------------------------------------------------------------------------- aggregation
def _fabricated_study(tmp_path):
    """3 methods, budgets 1 and 3, 3 repeats, 6 test subjects per repeat (overlapping between
    repeats, so the pairing key must include the repeat). Returns (config, dice values)."""
    config = _config(tmp_path, methods=("supervised", "self_training", "task_aug"),
                     repeats=3, compare=(("task_aug", "self_training"),))
    rng = np.random.default_rng(0)
    dice = {}
    for spec in study.plan_runs(config, {}):
        subjects = [f"s{spec.repeat + i}" for i in range(6)]
        key = (spec.labeled, spec.repeat)
        if spec.method == "supervised":
            dice[("supervised", *key)] = {s: rng.uniform(0.3, 0.7, 3) for s in subjects}
        elif spec.method == "self_training":
            base = dice[("supervised", *key)]
            # budget 3: identical to supervised (all differences zero); budget 1: better.
            dice[("self_training", *key)] = (
                {s: v.copy() for s, v in base.items()} if spec.labeled == 3 else
                {s: v + rng.uniform(-0.02, 0.08, 3) for s, v in base.items()})
        elif spec.repeat == 0:  # task_aug: only repeat 0 finished (6 pairs at most)
            dice[("task_aug", *key)] = {s: rng.uniform(0.2, 0.9, 3) for s in subjects[:4]}
        else:
            continue
        fabricate_run(config, spec, dice[(spec.method, *key)])
    return config, dice


def _pooled(dice, method, labeled, class_index, repeats=3):
    """{(repeat, subject): value} rebuilt from the fabricated numbers."""
    out = {}
    for repeat in range(repeats):
        for subject, values in dice.get((method, labeled, repeat), {}).items():
            value = (np.mean([round(v, 6) for v in values]) if class_index is None
                     else round(values[class_index], 6))
            out[(repeat, subject)] = value
    return out


def test_aggregation_and_wilcoxon_match_an_independent_computation(tmp_path):
    config, dice = _fabricated_study(tmp_path)
    result = study.aggregate_study(config, study.plan_runs(config, {}))
    assert result["classes"] == [*CLASSES, "mean"]
    assert result["num_runs"] == 18 and result["num_complete"] == 14
    assert result["total_seconds"] == pytest.approx(140.0)
    for method, labeled in (("supervised", 1), ("self_training", 3), ("task_aug", 1)):
        for index, name in [*enumerate(CLASSES), (None, "mean")]:
            values = np.array(list(_pooled(dice, method, labeled, index).values()))
            cell = result["results"][method][str(labeled)][name]["dice"]
            assert cell["n"] == len(values)
            assert cell["mean"] == pytest.approx(values.mean(), abs=1e-9)
            assert cell["std"] == pytest.approx(values.std(ddof=0), abs=1e-9)
            assert cell["median"] == pytest.approx(np.median(values), abs=1e-9)
    tests = {(t["a"], t["b"], t["labeled"], t["class"]): t for t in result["comparisons"]
             if t["metric"] == "dice"}
    # each method against supervised, then the named pair; no other pair.
    assert {k[:2] for k in tests} == {("self_training", "supervised"),
                                      ("task_aug", "supervised"),
                                      ("task_aug", "self_training")}
    for index, name in [*enumerate(CLASSES), (None, "mean")]:
        a = _pooled(dice, "self_training", 1, index)
        b = _pooled(dice, "supervised", 1, index)
        keys = sorted(a)  # 3 repeats × 6 subjects; s2 appears in all three repeats
        assert len(keys) == 18
        expected = stats.wilcoxon([a[k] for k in keys], [b[k] for k in keys])
        test = tests[("self_training", "supervised", 1, name)]
        assert test["n_pairs"] == 18
        assert test["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
        assert test["statistic"] == pytest.approx(expected.statistic)
        assert test["a_better"] == sum(a[k] > b[k] for k in keys)
        # degenerate: identical results at budget 3
        zero = tests[("self_training", "supervised", 3, name)]
        assert zero["p_value"] is None and zero["note"] == "n/a: all differences are zero"
        # too few pairs: task_aug has 4 subjects of repeat 0 only
        few = tests[("task_aug", "supervised", 1, name)]
        assert few["n_pairs"] == 4 and few["p_value"] is None
        assert few["note"] == "n/a: 4 pairs, fewer than the 5 required"
    # with min_pairs lowered the same pairs get a p-value, again equal to scipy's
    result = study.aggregate_study(
        dataclasses.replace(config, min_pairs=3), study.plan_runs(config, {}))
    a, b = _pooled(dice, "task_aug", 1, 0), _pooled(dice, "supervised", 1, 0)
    keys = sorted(set(a) & set(b))
    [few] = [t for t in result["comparisons"] if (t["a"], t["b"], t["labeled"], t["class"],
                                                  t["metric"]) == ("task_aug", "supervised", 1,
                                                                   "rv", "dice")]
    assert few["p_value"] == pytest.approx(
        stats.wilcoxon([a[k] for k in keys], [b[k] for k in keys]).pvalue, rel=1e-9)


def test_hd95_tests_count_the_lower_distance_as_better_and_are_reported(tmp_path):
    # task_aug: higher Dice on s0..s4 (lower on s5); lower HD95 on s0..s3 (higher on s4, s5)
    config = _config(tmp_path, methods=("supervised", "task_aug"), labeled=(1,), repeats=1)
    subjects = [f"s{i}" for i in range(6)]
    base_dice = {s: [0.5, 0.6, 0.7] for s in subjects}
    base_hd = {s: [10.0, 12.0, 14.0] for s in subjects}
    dice = {s: [v + (0.05 * (i + 1) if i < 5 else -0.1) for v in base_dice[s]]
            for i, s in enumerate(subjects)}
    hd95 = {s: [v + (-1.5 * (i + 1) if i < 4 else 3.0 + i) for v in base_hd[s]]
            for i, s in enumerate(subjects)}
    [sup, aug] = study.plan_runs(config, {})
    fabricate_run(config, sup, base_dice, hd95=base_hd)
    fabricate_run(config, aug, dice, hd95=hd95)
    result = study.aggregate_study(config, study.plan_runs(config, {}))
    tests = {t["metric"]: t for t in result["comparisons"]
             if (t["a"], t["b"], t["class"]) == ("task_aug", "supervised", "mean")}
    assert (tests["dice"]["a_better"], tests["dice"]["b_better"]) == (5, 1)
    assert (tests["hd95_mm"]["a_better"], tests["hd95_mm"]["b_better"]) == (4, 2)
    a = [np.mean(hd95[s]) for s in subjects]
    b = [np.mean(base_hd[s]) for s in subjects]
    assert tests["hd95_mm"]["mean_difference"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert tests["hd95_mm"]["p_value"] == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-9)
    with open(os.path.join(config.out_dir, "study.md"), encoding="utf-8") as f:
        markdown = f.read()
    section = markdown[markdown.index("## Paired Wilcoxon"):markdown.index("## Plots")]
    dice_part, hd_part = section.split("### HD95 (mm)")
    assert "### Dice" in dice_part
    assert "| task_aug vs supervised | 1 | mean | 6 | +0.1083 |" in dice_part
    assert f"| 5 / 1 | {tests['dice']['p_value']:.4g} |" in dice_part  # Δ (0.05+…+0.25−0.1)/6
    delta = tests["hd95_mm"]["mean_difference"]
    assert f"| task_aug vs supervised | 1 | mean | 6 | {delta:+.2f} |" in hd_part
    assert f"| 4 / 2 | {tests['hd95_mm']['p_value']:.4g} |" in hd_part


def test_reports_and_plots_are_written(tmp_path):
    config, _ = _fabricated_study(tmp_path)
    result = study.aggregate_study(config, study.plan_runs(config, {}))
    out = config.out_dir
    with open(os.path.join(out, "study.json"), encoding="utf-8") as f:
        assert json.load(f)["num_complete"] == result["num_complete"]
    with open(os.path.join(out, "study.md"), encoding="utf-8") as f:
        markdown = f.read()
    assert result["plots"]["label_efficiency"] == os.path.join("plots", "label_efficiency.png")
    paths = [result["plots"]["label_efficiency"], *result["plots"]["boxplots"].values()]
    assert len(paths) == 3
    for path in paths:
        assert f"]({path})" in markdown
        with open(os.path.join(out, path), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    cell = result["results"]["supervised"]["1"]["rv"]["dice"]
    assert f"| supervised | 18 | {cell['mean']:.3f} ± {cell['std']:.3f} ({cell['median']:.3f})" \
        in markdown
    p = [t for t in result["comparisons"] if t["metric"] == "dice" and t["labeled"] == 1
         and t["class"] == "mean" and t["a"] == "self_training"][0]["p_value"]
    assert f"| self_training vs supervised | 1 | mean | 18 |" in markdown
    assert f"{p:.4g} |" in markdown
    assert "n/a: all differences are zero" in markdown
    assert "(repeat, test subject)" in markdown
    assert "| task_aug | 3 | 1 | 1 | no | — |" in markdown  # unfinished run listed


def test_labeled_draws_are_listed_and_duplicates_and_mismatches_flagged(tmp_path):
    config = _config(tmp_path, labeled=(1,), repeats=3)
    specs = study.plan_runs(config, {})  # r0: supervised, self_training; r1: ...; r2: ...
    dice = {f"s{i}": [0.5, 0.6, 0.7] for i in range(3)}
    draws = {0: ["p07"], 1: ["p18"], 2: ["p18"]}
    for spec in specs:
        subjects = draws[spec.repeat]
        if spec.repeat == 0 and spec.method == "self_training":
            subjects = ["p09"]  # not the subject supervised trained on in repeat 0
        fabricate_run(config, spec, dice, labeled_subjects=subjects)
    result = study.aggregate_study(config, specs)
    info = result["labeled_draws"]
    assert info["draws"] == [{"labeled": 1, "repeat": 0, "seed": 0, "subjects": ["p07"]},
                             {"labeled": 1, "repeat": 1, "seed": 1, "subjects": ["p18"]},
                             {"labeled": 1, "repeat": 2, "seed": 2, "subjects": ["p18"]}]
    assert info["duplicates"] == [{"labeled": 1, "repeats": [1, 2], "subjects": ["p18"]}]
    assert info["mismatches"] == [{"labeled": 1, "repeat": 0,
                                   "methods": ["supervised", "self_training"],
                                   "subjects": [["p07"], ["p09"]]}]
    assert [r["labeled_subjects"] for r in result["runs"]][:2] == [["p07"], ["p09"]]
    with open(os.path.join(config.out_dir, "study.md"), encoding="utf-8") as f:
        markdown = f.read()
    assert "| 1 | 2 | 2 | p18 |" in markdown
    assert "repeats 1, 2 drew the same labeled subjects (p18)" in markdown
    assert "repeat 0: supervised trained on p07 but self_training on p09" in markdown
    # Distinct draws, consistent arms, or runs without config.json: no warning.
    for spec in specs:
        fabricate_run(config, spec, dice, labeled_subjects=[f"p{spec.repeat}"])
    clean = study.aggregate_study(config, specs)["labeled_draws"]
    assert (len(clean["draws"]), clean["duplicates"], clean["mismatches"]) == (3, [], [])
    for spec in specs:
        os.remove(os.path.join(spec.run_dir, "config.json"))
    result = study.aggregate_study(config, specs)
    assert result["labeled_draws"] == {"draws": [], "mismatches": [], "duplicates": []}
    with open(os.path.join(config.out_dir, "study.md"), encoding="utf-8") as f:
        assert "## Labeled draws" not in f.read()


def _colliding_seed(pools, num_labeled=1):
    """A base seed b whose drawn labeled subjects are the same with split seeds b+1 and b+2."""
    def draw(seed):
        return splits.draw_split(*pools, num_labeled, seed).labeled
    return next(b for b in range(500) if draw(b + 1) == draw(b + 2))


def test_repeat_seeds_skip_seeds_that_repeat_a_labeled_draw(tmp_path):
    pools = splits.patient_pools(_manifest(write_records(tmp_path / "records")))
    base = _colliding_seed(pools)
    config = _config(tmp_path, labeled=(1,), repeats=3, seed=base)
    independent = study.repeat_seeds(dataclasses.replace(config, draws="independent"), pools)
    assert independent == [base, base + 1, base + 2]
    seeds = study.repeat_seeds(config, pools)
    draws = [splits.draw_split(*pools, 1, seed).labeled for seed in seeds]
    assert seeds[:2] == [base, base + 1] and seeds[2] > base + 2  # only the repeat is moved
    assert len(set(draws)) == 3
    for skipped in range(base + 2, seeds[2]):  # every seed in between repeats a draw
        assert splits.draw_split(*pools, 1, skipped).labeled in draws[:2]
    # Unknown pool: only repeat 0's seed is known; one repeat: nothing to choose.
    assert study.repeat_seeds(config, None) == [base, None, None]
    assert study.repeat_seeds(dataclasses.replace(config, repeats=1), None) == [base]
    # Distinct at every budget.
    config = _config(tmp_path, labeled=(1, 2), repeats=6)
    seeds = study.repeat_seeds(config, pools)
    for n in (1, 2):
        assert len({splits.draw_split(*pools, n, seed).labeled for seed in seeds}) == 6
    # Fewer possible draws than repeats (3 candidates for 1 labeled): the study goes on.
    tiny = ([f"p{i}" for i in range(5)], [])
    config = _config(tmp_path, labeled=(1,), repeats=4, num_val=1, num_test=1)
    seeds = study.repeat_seeds(config, tiny)
    assert len(seeds) == 4 and seeds == sorted(set(seeds))
    assert len({splits.draw_split(*tiny, 1, s, 1, 1).labeled for s in seeds[:3]}) == 3


def test_distinct_draws_run_on_the_chosen_seeds_and_refuse_independent_folders(tmp_path):
    records = write_records(tmp_path / "records")
    pools = splits.patient_pools(_manifest(records))
    base = _colliding_seed(pools)
    config = _config(tmp_path, methods=("supervised",), labeled=(1,), repeats=3, seed=base)
    calls, lines = [], []
    result = study.run_study(config, runner=_fake_runner(config, calls, records_dir=records),
                             progress=lines.append, records=_records(records))
    expected = study.repeat_seeds(config, pools)
    assert expected[2] != base + 2
    assert [r["split_seed"] for r in result["runs"]] == expected
    with open(os.path.join(calls[2], study.REQUEST_NAME), encoding="utf-8") as f:
        assert json.load(f)["request"]["split_seed"] == expected[2]
    assert result["labeled_draws"]["duplicates"] == []
    with open(os.path.join(config.out_dir, "study.md"), encoding="utf-8") as f:
        markdown = f.read()
    assert f"| supervised | 1 | 2 | {expected[2]} | yes |" in markdown
    assert "the next seed whose labeled subjects no earlier repeat drew" in markdown
    # The same study with independent draws repeats a labeled subject, and says so ...
    independent = dataclasses.replace(config, draws="independent",
                                      out_dir=str(tmp_path / "independent"))
    result = study.run_study(independent, runner=_fake_runner(independent, [], records_dir=records),
                             progress=lines.append, records=_records(records))
    assert [r["split_seed"] for r in result["runs"]] == [base, base + 1, base + 2]
    assert result["labeled_draws"]["duplicates"][0]["repeats"] == [1, 2]
    # ... and its folders are not mistaken for the distinct study's.
    moved = dataclasses.replace(config, out_dir=independent.out_dir)
    with pytest.raises(ValueError, match=r"r2 holds a run made with other settings \(differs "
                                         r"in: split_seed, seed\)"):
        study.run_study(moved, runner=_fake_runner(moved, [], records_dir=records),
                        progress=lines.append, records=_records(records))


def test_distinct_draws_are_planned_from_the_records_before_any_run(tmp_path):
    """The study finds its records first, so every repeat's distinct draw is known before the
    first run starts, even on a fresh records_root and with runs that name no records folder
    (reading the pools back from a finished run's config.json chose them one run too late)."""
    records = write_records(tmp_path / "records")
    pools = splits.patient_pools(_manifest(records))
    base = _colliding_seed(pools)
    config = _config(tmp_path, methods=("supervised", "self_training"), labeled=(1, 2),
                     repeats=3, seed=base, records_root=str(tmp_path / "fresh"))
    found, calls = [], []

    def runner(argv, log_path):  # finishes runs but writes no config.json
        assert found, "the records were not resolved before the first run"
        calls.append(argv)
        run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("--run_dir="))
        seed = int(next(a.split("=", 1)[1] for a in argv if a.startswith("--split_seed=")))
        spec = next(s for s in study.plan_runs(config, {}) if os.path.abspath(s.run_dir) == run_dir)
        fabricate_run(config, dataclasses.replace(spec, seed=seed), {"s0": [0.5, 0.6, 0.7]})
        return 0

    result = study.run_study(config, runner=runner, progress=lambda line: None,
                             records=_records(records, found))
    assert found == [os.path.join(config.out_dir, study.PREPROCESS_LOG_NAME)]  # once, first
    expected = study.repeat_seeds(config, pools)
    assert None not in expected and expected[2] != base + 2
    seeds = [int(next(a.split("=", 1)[1] for a in argv if a.startswith("--split_seed=")))
             for argv in calls]
    assert seeds == [expected[s.repeat] for s in study.plan_runs(config, {})]
    for n in config.labeled:  # distinct labeled subjects in every repeat, at every budget
        assert len({splits.draw_split(*pools, n, seed).labeled for seed in expected}) == 3
    assert all(f"--records_dir={os.path.abspath(records)}" in argv for argv in calls)
    assert [r["split_seed"] for r in result["runs"]] == [expected[r["repeat"]]
                                                         for r in result["runs"]]
    assert result["num_complete"] == 12
    with pytest.raises(ValueError, match="--draws=sometimes: choose one of distinct, independent"):
        _config(tmp_path, draws="sometimes")


def test_records_are_resolved_by_a_preprocess_child_with_the_train_settings(tmp_path):
    config = _config(tmp_path, dataset="acdc", data_dir=str(tmp_path / "empty"), n4=False,
                     dataset_options={"phase": "ED"}, records_root=str(tmp_path / "records"),
                     preprocess_workers=2)
    argv = study.preprocess_argv(config)
    assert argv[:3] == [sys.executable, "-m", "launch.preprocess"]
    assert sorted(argv[3:]) == sorted([
        "--dataset=acdc", f"--records_root={tmp_path / 'records'}", "--workers=2", "--non4",
        f"--data_dir={tmp_path / 'empty'}", "--phase=ED"])
    spec = study.plan_runs(config, {})[0]  # launch.train gets the same settings
    for flag in ("--dataset=acdc", f"--records_root={tmp_path / 'records'}", "--non4",
                 "--preprocess_workers=2", f"--data_dir={tmp_path / 'empty'}", "--phase=ED"):
        assert flag in spec.train_argv(config), flag
    # A failing preprocessing (here: an empty data folder) stops the study with its error.
    os.makedirs(tmp_path / "empty")
    log = str(tmp_path / "study" / study.PREPROCESS_LOG_NAME)
    with pytest.raises(ValueError, match=r"Preprocessing acdc for the study failed \(exit code "
                                         r"2\): .*empty does not look like the acdc dataset.*; "
                                         r"see .*study_preprocess\.log"):
        study.resolve_records(config, log)
    with open(log, encoding="utf-8") as f:
        first_line = f.readline()
    assert first_line.startswith("# ") and "-m launch.preprocess --dataset=acdc" in first_line


# --------------------------------------------------------------------------- running and resume
def _fake_runner(config, calls, fail_on=None, records_dir=None):
    """Stands in for launch.train: records the call and writes a finished run (drawing its
    labeled subjects from `records_dir`'s manifest with the --split_seed it is given)."""
    specs = {os.path.abspath(s.run_dir): s for s in study.plan_runs(config, {})}
    records_dir = records_dir or write_records(os.path.join(config.out_dir, "..", "records"))

    def runner(argv, log_path):
        run_dir = next(a.split("=", 1)[1] for a in argv if a.startswith("--run_dir="))
        seed = int(next(a.split("=", 1)[1] for a in argv if a.startswith("--split_seed=")))
        calls.append(run_dir)
        spec = dataclasses.replace(specs[run_dir], seed=seed)
        if fail_on == (spec.method, spec.labeled, spec.repeat):
            with open(log_path, "a", encoding="utf-8") as log:
                log.write("Traceback...\nlaunch.train: error: the split is too small.\n")
            return 1
        fabricate_run(config, spec, {f"s{i}": [0.5, 0.6, 0.7] for i in range(3)},
                      records_dir=records_dir)
        return 0

    return runner


def test_interrupted_study_resumes_skipping_finished_runs(tmp_path):
    config = _config(tmp_path, labeled=(1,), repeats=2)
    specs = study.plan_runs(config, {"supervised": (), "self_training": ()})
    fabricate_run(config, specs[0], {"s0": [0.1, 0.2, 0.3]})
    fabricate_run(config, specs[2], {"s0": [0.1, 0.2, 0.3]})
    # An unfinished run (killed mid-training): request written, no summary -> run again.
    os.makedirs(specs[1].run_dir)
    with open(os.path.join(specs[1].run_dir, study.REQUEST_NAME), "w", encoding="utf-8") as f:
        json.dump({"request": specs[1].request(config), "seconds": 5.0}, f)
    calls, lines = [], []
    records = _records(write_records(tmp_path / "records"))
    result = study.run_study(config, runner=_fake_runner(config, calls), progress=lines.append,
                             records=records)
    assert calls == [os.path.abspath(specs[1].run_dir), os.path.abspath(specs[3].run_dir)]
    assert lines[0].startswith(f"Study {config.out_dir}: finding the records of "
                               "synthetic_cardiac (preprocessed on first use; log: ")
    assert "2 already finished, 2 to run; records: " in lines[1]
    assert re.match(r"\[1/2\] self_training l1 r0: test mean Dice 0\.6000 in \d+ s; elapsed "
                    r"\d:\d\d:\d\d, ETA \d:\d\d:\d\d$", lines[2])
    assert lines[3].startswith("[2/2] self_training l1 r1") and lines[3].endswith("ETA 0:00:00")
    assert result["num_complete"] == 4
    with open(os.path.join(specs[1].run_dir, study.REQUEST_NAME), encoding="utf-8") as f:
        assert json.load(f)["seconds"] >= 5.0  # time of the interrupted attempt kept
    calls.clear()
    study.run_study(config, runner=_fake_runner(config, calls), progress=lines.append,
                    records=records)
    assert calls == []  # everything finished: nothing re-run


def test_changed_settings_and_failed_runs_are_reported(tmp_path):
    config = _config(tmp_path, labeled=(1,), repeats=1)
    calls, found = [], []
    records = _records(write_records(tmp_path / "records"), found)
    message = (r"Run self_training l1 r0 failed \(exit code 1\): error: the split is too "
               r"small\.; see .*self_training/l1/r0/study_train.log")
    with pytest.raises(ValueError, match=message):
        study.run_study(config, runner=_fake_runner(config, calls,
                                                    fail_on=("self_training", 1, 0)),
                        progress=lambda line: None, records=records)
    assert len(calls) == 2
    changed = _config(tmp_path, labeled=(1,), repeats=1, overrides=("filters=4,8",))
    calls.clear()
    found.clear()
    with pytest.raises(ValueError, match=r"runs/supervised/l1/r0 holds a run made with other "
                                         r"settings \(differs in: overrides\)"):
        study.run_study(changed, runner=_fake_runner(changed, calls), progress=lambda l: None,
                        records=records)
    assert calls == [] and found == []  # refused before anything ran, even preprocessing


def test_subprocess_runner_logs_and_returns_the_exit_code(tmp_path):
    log = str(tmp_path / "run" / "log.txt")
    assert study.subprocess_runner([sys.executable, "-c", "print('hello'); import sys; "
                                    "sys.exit(3)"], log) == 3
    with open(log, encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("# ") and "hello" in text


# --------------------------------------------------------------------------- CLI
def test_cli_errors_before_anything_runs(tmp_path, capsys):
    out = str(tmp_path / "study")
    cases = [
        (["--dataset=synthetic_cardiac", "--methods=supervised,nope", "--labeled=1"],
         r"unknown method\(s\) nope in --methods\. Available: .*supervised"),
        (["--dataset=nope", "--methods=supervised", "--labeled=1"], r"unknown --dataset=nope"),
        (["--dataset=synthetic_cardiac", "--methods=supervised", "--labeled=x"],
         "expected integers"),
        (["--dataset=synthetic_cardiac", "--methods=supervised", "--labeled=1", "--set=zzz=1"],
         "has a setting 'zzz'"),
        (["--dataset=synthetic_cardiac", "--methods=supervised", "--labeled=1",
          "--preset=fast"], "Unknown preset 'fast'"),
        (["--dataset=synthetic_cardiac", "--methods=supervised,a/b=supervised", "--labeled=1"],
         "expected a method name or label=method"),
        (["--dataset=synthetic_cardiac", "--methods=supervised,RD=nope", "--labeled=1"],
         r"unknown method\(s\) nope in --methods"),
        (["--dataset=synthetic_cardiac", "--methods=supervised,RD=supervised", "--labeled=1",
          "--set=RD:rounds=1"], r"Method 'RD' \(supervised\).*no field 'rounds'"),
        (["--dataset=synthetic_cardiac", "--methods=supervised", "--labeled=1",
          "--draws=sometimes"], r"--draws.*distinct, independent|distinct.*independent"),
        (["--dataset=synthetic_cardiac", "--methods=supervised", "--labeled=1",
          "--target_dataset=nope"], r"unknown --target_dataset=nope"),
        (["--dataset=synthetic_cardiac", "--methods=supervised", "--labeled=1",
          "--target_option=phase=ES"], r"--target_option need --target_dataset"),
        (["--dataset=synthetic_cardiac", "--methods=supervised", "--labeled=1",
          "--dataset_option=oops"], r"--dataset_option='oops': expected"),
        (["--dataset=synthetic_cardiac", "--methods=supervised", "--labeled=1",
          "--labeled_fraction=0.1"], r"either --labeled=N,... or --labeled_fraction"),
        (["--dataset=synthetic_cardiac", "--methods=supervised"],
         r"either --labeled=N,... or --labeled_fraction"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            study_cli.main(["launch.study", *args, f"--out={out}"])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err), args
    assert not os.path.exists(out)


def test_cli_aggregate_only(tmp_path, capsys):
    config = _config(tmp_path, labeled=(1,), repeats=1)
    for spec in study.plan_runs(config, {"supervised": (), "self_training": ()}):
        fabricate_run(config, spec, {"s0": [0.5, 0.5, 0.5]})
    assert study_cli.main(["launch.study", "--dataset=synthetic_cardiac",
                           "--methods=supervised,self_training", "--labeled=1", "--repeats=1",
                           f"--out={config.out_dir}", "--aggregate_only"]) == 0
    assert "2/2 runs finished" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(config.out_dir, "study.md"))


# --------------------------------------------------------------------------- target domain
TARGET = dict(target_dataset="synthetic_brain", target_data_dir="target_data",
              target_dataset_options={"modalities": "t1"})


def fabricate_target(spec, dice, hd95):
    """Writes a run's target-domain results (one class "wt"): {subject: value}."""
    folder = os.path.join(spec.run_dir, "target")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["subject", "class", "dice", "iou", "hd95_mm", "asd_mm", "precision",
                         "recall"])
        for subject in dice:
            writer.writerow([subject, "wt", dice[subject], "0.5", hd95[subject], "1", "1", "1"])
    with open(os.path.join(folder, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"split": "test", "num_subjects": len(dice)}, f)


def test_every_run_carries_the_target_and_source_options(tmp_path):
    config = _config(tmp_path, labeled=(1,), repeats=2, dataset_options={"phase": "ES",
                     "extra": "x"}, target_records_dir=str(tmp_path / "trec"), **TARGET)
    argvs = []
    fake = _fake_runner(config, [])

    def runner(argv, log_path):
        argvs.append(argv)
        return fake(argv, log_path)

    study.run_study(config, runner=runner, progress=lambda line: None,
                    records=_records(write_records(tmp_path / "records")))
    assert len(argvs) == 4
    for argv in argvs:
        for flag in ("--target_dataset=synthetic_brain",
                     f"--target_data_dir={os.path.abspath('target_data')}",
                     f"--target_records_dir={tmp_path / 'trec'}",
                     "--target_option=modalities=t1", "--phase=ES",
                     "--dataset_option=extra=x"):
            assert flag in argv, (flag, argv)
    assert "--dataset_option=extra=x" in study.preprocess_argv(config)
    assert not any("target" in a for a in study.preprocess_argv(config))
    assert not any("target" in a for a in study.plan_runs(_config(tmp_path), {})[0]
                   .train_argv(_config(tmp_path)))
    with open(os.path.join(config.out_dir, "study.json"), encoding="utf-8") as f:
        recorded = json.load(f)["target"]
    assert recorded["dataset"] == "synthetic_brain"
    assert recorded["dataset_options"] == {"modalities": "t1"}
    assert recorded["data_dir"] == os.path.abspath("target_data")
    assert recorded["records_dir"] == str(tmp_path / "trec")
    with pytest.raises(ValueError, match="need --target_dataset"):
        _config(tmp_path, target_data_dir="x")


def test_target_section_reports_target_metrics_and_missing_runs(tmp_path):
    config = _config(tmp_path, labeled=(1,), repeats=3, min_pairs=3, **TARGET)
    specs = study.plan_runs(config, {"supervised": (), "self_training": ()})
    target = {("supervised", 0): ([0.5, 0.7], [10, 12]), ("supervised", 1): ([0.6, 0.8], [14, 16]),
              ("self_training", 0): ([0.6, 0.9], [4, 6]),
              ("self_training", 1): ([0.7, 0.8], [8, 10])}
    for spec in specs:
        fabricate_run(config, spec, {"s0": [0.5, 0.5, 0.5], "s1": [0.5, 0.5, 0.5]})
        if (spec.method, spec.repeat) in target:  # repeat 2: no target/ files
            dice, hd95 = target[(spec.method, spec.repeat)]
            fabricate_target(spec, {"t0": dice[0], "t1": dice[1]},
                             {"t0": hd95[0], "t1": hd95[1]})
    result = study.aggregate_study(config, specs)
    with open(os.path.join(config.out_dir, "study.md"), encoding="utf-8") as f:
        md = f.read()
    section = md[md.index("## Target domain: synthetic_brain"):md.index("## Runs")]
    # Hand-computed: supervised Dice 0.5, 0.7, 0.6, 0.8 -> mean 0.65, std sqrt(0.0125) = 0.112;
    # self_training 0.6, 0.9, 0.7, 0.8 -> 0.75 ± 0.112; HD95 10..16 -> 13 ± sqrt(5) = 2.24,
    # 4..10 -> 7 ± 2.24. Runs' mean Dice: 0.6, 0.7 -> 0.65 ± 0.05; 0.75, 0.75 -> 0.75 ± 0.
    assert "| supervised | 4 | 0.650 ± 0.112 (0.650) | 0.650 ± 0.112 (0.650) | " \
           "0.650 ± 0.050 (0.650) (2 runs) |" in section
    assert "| self_training | 4 | 0.750 ± 0.112 (0.750) | 0.750 ± 0.112 (0.750) | " \
           "0.750 ± 0.000 (0.750) (2 runs) |" in section
    assert "| supervised | 4 | 13.00 ± 2.24 (13.00) | 13.00 ± 2.24 (13.00) |" in section
    assert "| self_training | 4 | 7.00 ± 2.24 (7.00) | 7.00 ± 2.24 (7.00) |" in section
    # Paired on (repeat, subject): Dice differences 0.1, 0.2, 0.1, 0.0; HD95 -6 each.
    p = stats.wilcoxon([0.6, 0.9, 0.7, 0.8], [0.5, 0.7, 0.6, 0.8]).pvalue
    assert (f"| self_training vs supervised | 1 | wt | 4 | +0.1000 | +0.1000 | 3 / 0 | "
            f"{p:.4g} |") in section
    assert "| self_training vs supervised | 1 | wt | 4 | -6.00 | -6.00 | 4 / 0 |" in section
    assert "**Missing:**" in section
    for method in ("supervised", "self_training"):
        assert os.path.join("runs", method, "l1", "r2") in section
    assert "Runs with target results: 4 / 6" in section
    # The source section is unchanged by the target (all 0.5) and comes first.
    assert md.index("## Dice") < md.index("## Target domain")
    assert "| target mean Dice |" in md and "| 0.5000 | 0.6500 |" not in md
    assert "| supervised | 1 | 0 | 0 | yes | 0.5000 | 0.6000 |" in md
    assert "| supervised | 1 | 2 | 2 | yes | 0.5000 | — |" in md
    tr = result["target"]
    assert tr["classes"] == ["wt", "mean"] and tr["num_complete"] == 4
    assert tr["results"]["supervised"]["1"]["wt"]["dice"]["mean"] == pytest.approx(0.65)
    assert tr["results"]["self_training"]["1"]["mean"]["hd95_mm"]["mean"] == pytest.approx(7.0)
    assert result["results"]["supervised"]["1"]["mean"]["dice"]["mean"] == pytest.approx(0.5)
    # Without a target domain: no section, no column.
    plain = _config(tmp_path, labeled=(1,), repeats=3, min_pairs=3)
    assert study.aggregate_study(plain, specs)["target"] is None
    with open(os.path.join(config.out_dir, "study.md"), encoding="utf-8") as f:
        md = f.read()
    assert "Target domain" not in md and "target mean Dice" not in md


def test_changing_the_target_between_runs_is_refused(tmp_path):
    config = _config(tmp_path, labeled=(1,), repeats=1, **TARGET)
    records = _records(write_records(tmp_path / "records"))
    calls = []
    study.run_study(config, runner=_fake_runner(config, calls), progress=lambda line: None,
                    records=records)
    assert len(calls) == 2
    for changes in ({"target_dataset": "synthetic_cardiac"},
                    {"target_dataset_options": {"modalities": "t2"}},
                    {"target_data_dir": "elsewhere"},
                    {"target_dataset": None, "target_data_dir": None,
                     "target_dataset_options": {}}):
        changed = _config(tmp_path, labeled=(1,), repeats=1, **{**TARGET, **changes})
        calls.clear()
        with pytest.raises(ValueError, match=r"runs/supervised/l1/r0 holds a run made with "
                                             r"other settings \(differs in: target\)"):
            study.run_study(changed, runner=_fake_runner(changed, calls),
                            progress=lambda line: None, records=records)
        assert calls == []
    study.run_study(config, runner=_fake_runner(config, calls), progress=lambda line: None,
                    records=records)  # the same target: resumes (nothing left to run)
    assert calls == []


# --------------------------------------------------------------------------- end to end
def _pids_with(text):
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.slow
def test_synthetic_study_killed_then_resumed(tmp_path, capsys):
    """A real study (2 methods × 1 budget × 2 repeats, tiny networks): SIGKILL the study while
    its second run trains (the training child dies with it), then the same command skips the
    finished run, resumes the killed one and writes the report (about 3 minutes)."""
    out = tmp_path / "study"
    args = ["--dataset=synthetic_cardiac", "--methods=supervised,self_training", "--labeled=1",
            "--repeats=2", "--preset=quick", "--steps=4", "--validation_every=2",
            "--set=filters=4,8", "--set=batch_size=4", "--set=self_training:round_steps=2",
            "--set=self_training:rounds=1", "--num_val=1", "--num_test=3", "--non4",
            "--min_pairs=3", f"--records_root={tmp_path / 'records'}", f"--out={out}"]
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    first = subprocess.Popen([sys.executable, "-m", "launch.study", *args], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    second_run = out / "runs" / "self_training" / "l1" / "r0"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if (second_run / "study_run.json").is_file():
            break
        time.sleep(0.2)
    time.sleep(3)
    first.send_signal(signal.SIGKILL)
    stdout, _ = first.communicate()
    assert first.returncode == -signal.SIGKILL, stdout
    assert "[1/4] supervised l1 r0: test mean Dice" in stdout
    time.sleep(1)
    assert _pids_with(f"--run_dir={second_run}") == []  # the training child died too

    assert study_cli.main(["launch.study", *args]) == 0
    printed = capsys.readouterr().out
    assert "1 already finished, 3 to run" in printed and "[3/3]" in printed
    with open(out / "study.json", encoding="utf-8") as f:
        result = json.load(f)
    assert result["num_complete"] == 4 and result["classes"] == ["rv", "myocardium", "lv",
                                                                   "mean"]
    # The study preprocessed once, into the folder launch.train itself would choose (same
    # fingerprint), and every run trained on those records.
    from preprocessing.config import PreprocessConfig, fingerprint, records_dir
    from tfseg.datasets import get_dataset

    dataset = get_dataset("synthetic_cardiac")
    expected = records_dir(str(tmp_path / "records"), dataset.name,
                           fingerprint(dataset, {}, PreprocessConfig(n4=False)),
                           dataset.prepare(None))
    assert sorted(os.listdir(tmp_path / "records" / dataset.name)) == sorted(
        [os.path.basename(expected), "splits"])
    for run in result["runs"]:
        with open(out / run["run_dir"] / "config.json", encoding="utf-8") as f:
            assert json.load(f)["records_dir"] == os.path.abspath(expected)
    draws = result["labeled_draws"]  # distinct draws (the default), read from the records
    assert [d["repeat"] for d in draws["draws"]] == [0, 1] and draws["duplicates"] == []
    assert draws["draws"][0]["subjects"] != draws["draws"][1]["subjects"]
    # The p-values recomputed from the runs' metrics.csv, paired on (repeat, subject).
    values = {}
    for run in result["runs"]:
        with open(out / run["run_dir"] / "metrics.csv", newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row["class"] == "lv":
                    values.setdefault(run["method"], {})[(run["repeat"], row["subject"])] = \
                        float(row["dice"])
    keys = sorted(values["supervised"])
    assert len(keys) == 6 and sorted(values["self_training"]) == keys
    [test] = [t for t in result["comparisons"] if t["class"] == "lv" and t["metric"] == "dice"]
    a = [values["self_training"][k] for k in keys]
    b = [values["supervised"][k] for k in keys]
    if np.any(np.array(a) != np.array(b)):
        assert test["p_value"] == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-9)
    with open(out / "study.md", encoding="utf-8") as f:
        assert "![Dice vs labeled subjects](plots/label_efficiency.png)" in f.read()
    assert (out / "plots" / "boxplot_l1.png").is_file()


def test_labeled_fractions_become_budgets_of_the_7_1_2_split(tmp_path):
    """--labeled_fraction: counted from the annotated patients the dataset lists."""
    from tests.test_regions import write_brats2018

    data = str(tmp_path / "brats")
    write_brats2018(data, num_hgg=20, num_lgg_unlabeled=2, shape_zyx=(1, 4, 4))
    # 20 annotated: test 4, val 2, 14 training -> 10%: 1, 30%: 4, 100%: 14
    assert study_cli.fraction_budgets("brats", data, {}, [0.1, 0.3, 1.0]) == ((1, 4, 14), 2, 4)
    with pytest.raises(ValueError, match="same number of labeled patients twice"):
        study_cli.fraction_budgets("brats", data, {}, [0.1, 0.05])  # both 1 patient
