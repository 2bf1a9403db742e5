"""Tests for tfseg.report_html and the overlay hooks: the run page parses, everything it
references is inside the run folder and exists, subjects are sorted worst first; launch.evaluate
writes montages and the page (classes and BraTS regions); launch.predict --overlays; the study
page links every run's page."""
import base64
import csv
import html.parser
import json
import os
import time
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from tfseg import report_html
from tfseg.evaluate import summarize
from tfseg.visualize import write_subject_overlay

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(html.parser.HTMLParser):
    """Collects every src/href, every id, the tags and the text of a page."""

    def __init__(self):
        super().__init__()
        self.references, self.ids, self.tags, self.text = [], set(), [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href"):
                self.references.append((tag, value))
            if name == "id":
                self.ids.add(value)

    def handle_data(self, data):
        self.text.append(data)


def check_page(path):
    """Parses a page; asserts every reference is a fragment of the page, an embedded PNG, or a
    file inside the page's folder that exists. Returns the parser."""
    folder = os.path.realpath(os.path.dirname(path))
    page = _Page()
    with open(path, encoding="utf-8") as f:
        page.feed(f.read())
    page.close()
    assert not {"script", "link", "iframe", "object"} & set(page.tags)  # nothing to fetch
    for tag, value in page.references:
        if value.startswith("#"):
            assert value[1:] in page.ids, value
            continue
        if value.startswith("data:"):
            assert tag == "img" and value.startswith("data:image/png;base64,")
            assert base64.b64decode(value.split(",", 1)[1])[:8] == PNG_MAGIC
            continue
        parsed = urlparse(value)
        assert not parsed.scheme and not parsed.netloc and not value.startswith("/"), value
        target = os.path.realpath(os.path.join(folder, unquote(parsed.path)))
        assert os.path.commonpath([folder, target]) == folder, value
        assert os.path.isfile(target), value
    return page


# --------------------------------------------------------------------------- a fabricated run
def _fabricated_run(tmp_path):
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    names = ["lv", "myo"]
    config = {"method": "supervised", "preset": "quick", "dataset": "synthetic_cardiac",
              "dataset_options": {"phase": "ES"}, "checkpoint_policy": "best_val",
              "method_config": {"steps": 40, "filters": [4, 8]},
              "data_spec": {"class_names": ["background", *names], "region_names": []},
              "split": {"name": "c1", "seed": 0, "labeled": ["p1"], "unlabeled": ["p9"],
                        "val": ["p2"], "test": ["p3", "p4", "p5"]},
              "train": {"overrides": ["filters=4,8"], "seed": 0},
              "stages": [{"name": "pretrain", "steps": 20}, {"name": "train", "steps": 20}]}
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(run_dir, "train_log.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stage", "step", "epoch", "elapsed_s", "loss", "disc_loss",
                         "lr_seg_optimizer", "val_mean_dice", "val_dice_lv", "val_dice_myo"])
        writer.writerow(["pretrain", 10, 1, 2.0, 0.9, "", 0.001, 0.2, 0.3, 0.1])
        writer.writerow(["pretrain", 20, 2, 4.0, 0.6, "", 0.001, 0.4, 0.5, 0.3])
        writer.writerow(["train", 30, 3, 6.0, 0.5, 0.7, 0.001, 0.5, 0.6, 0.4])
    dice = {"p3": [0.9, 0.8], "p4": [0.2, 0.4], "p5": [0.6, 0.7]}
    rows, per_subject = [], {}
    for subject, values in dice.items():
        record = {"miou": 0.5, "seconds": 0.1}
        for name, value in zip(names, values):
            metrics = {m: value for m in ("dice", "iou", "precision", "recall")}
            metrics.update(hd95_mm=3.0, asd_mm=1.0, miou=0.5, auc=None)
            rows.append({"subject": subject, "class": name, **metrics})
            record[name] = metrics
        per_subject[subject] = record
    summary = summarize(rows, per_subject, names, split="test",
                        extra={"checkpoint": "best_val", "flip_tta": False})
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    for name in ("summary.md", "metrics.csv"):
        open(os.path.join(run_dir, name), "w").close()
    os.makedirs(os.path.join(run_dir, "predictions"))
    open(os.path.join(run_dir, "predictions", "p4_seg.nii.gz"), "wb").close()
    label = np.zeros((2, 12, 12), np.int32)
    label[:, 3:8, 3:8] = 1
    label[:, 8:10, 8:10] = 2
    masks = np.stack([label == 1, label == 2], axis=-1)
    for subject in ("p3", "p4"):  # p5 without a montage (e.g. written before a crash)
        write_subject_overlay(os.path.join(run_dir, "overlays"), subject,
                              label.astype(np.float32), (1, 1, 1), names, masks, masks,
                              dice[subject], panel_size=48)
    return run_dir, summary


def test_run_page_is_offline_complete_and_sorted_worst_first(tmp_path):
    run_dir, summary = _fabricated_run(tmp_path)
    path = report_html.write_run_report(run_dir)
    assert path == os.path.join(run_dir, "report.html") and os.path.getsize(path) > 5000
    page = check_page(path)
    text = " ".join(page.text)
    images = [v for t, v in page.references if t == "img"]
    assert images[0].startswith("data:image/png")  # the training curves, embedded
    assert images[1:] == ["overlays/dice0.300_p4.png", "overlays/dice0.850_p3.png"]
    # Subjects worst first: p4 (0.30), p5 (0.65), p3 (0.85), each with its per-class Dice.
    assert text.index("p4") < text.index("p5") < text.index("p3")
    lv = summary["classes"]["lv"]["dice"]
    assert f"{lv['mean']:.3f} ± {lv['std']:.3f} ({lv['median']:.3f})" in text
    assert "0.567 ± 0.287 (0.600)" in text  # by hand: lv Dice 0.9, 0.2, 0.6
    assert "0.567 ± 0.287" in text.split("worst first")[1]  # the subject table's last row
    assert "0.600 ± 0.227" in text  # per-subject mean Dice 0.85, 0.30, 0.65 (ddof=0)
    assert "synthetic_cardiac / supervised" in text and "filters=4,8" in text
    assert "labeled 1, unlabeled 1, val 1, test 3" in text
    assert ("a", "predictions/p4_seg.nii.gz") in page.references
    assert ("a", "#evaluation-p4") in page.references
    assert ("a", "#evaluation-p5") not in page.references  # no montage, no link


def test_page_without_montages_or_log_still_checks_out(tmp_path):
    run_dir, _ = _fabricated_run(tmp_path)
    os.remove(os.path.join(run_dir, "train_log.csv"))
    for name in os.listdir(os.path.join(run_dir, "overlays")):
        os.remove(os.path.join(run_dir, "overlays", name))
    page = check_page(report_html.write_run_report(run_dir))
    assert not [v for t, v in page.references if t == "img"]
    assert "No montages" in " ".join(page.text)


def test_training_curves_plot_every_term_with_gaps():
    rows = [{"stage": "a", "step": "1", "loss": "1.0", "gan": "", "val_mean_dice": "0.1"},
            {"stage": "b", "step": "2", "loss": "0.5", "gan": "0.3", "val_mean_dice": "0.4"}]
    png = report_html.training_curves_png(rows, [])
    assert png[:8] == PNG_MAGIC and len(png) > 5000


# --------------------------------------------------------------------------- end to end
def _overlay_files(folder):
    return sorted(os.listdir(os.path.join(folder, "overlays")))


def test_launch_evaluate_writes_montages_and_the_page(tmp_path):
    from launch import evaluate as launcher
    from test_evaluate import build_tiny_run
    import matplotlib.image as mpimg

    run = build_tiny_run(tmp_path, spatial_dims=2)
    run_dir = run["run_dir"]
    started = time.perf_counter()
    assert launcher.main(["launch.evaluate", f"--run_dir={run_dir}", "--nooverlays"]) == 0
    without = time.perf_counter() - started
    assert not os.path.exists(os.path.join(run_dir, "overlays"))
    check_page(os.path.join(run_dir, "report.html"))
    started = time.perf_counter()
    assert launcher.main(["launch.evaluate", f"--run_dir={run_dir}"]) == 0
    with_overlays = time.perf_counter() - started
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    files = _overlay_files(run_dir)
    expected = []
    for subject, record in summary["subjects"].items():
        mean = np.mean([record[n]["dice"] for n in ("csf", "gm", "wm")])
        expected.append(f"dice{mean:.3f}_{subject}.png")
        assert record["overlay_seconds"] >= 0
    assert files == sorted(expected)
    for name in files:
        path = os.path.join(run_dir, "overlays", name)
        assert os.path.getsize(path) > 5000
        height, width = mpimg.imread(path).shape[:2]
        assert 150 < height < 1500 and 500 < width < 1500
    page = check_page(os.path.join(run_dir, "report.html"))
    assert [v for t, v in page.references if t == "img"] == [f"overlays/{n}" for n in files]
    print(f"evaluate: {without:.2f} s without overlays, {with_overlays:.2f} s with; overlay s "
          f"per subject {[r['overlay_seconds'] for r in summary['subjects'].values()]}")


def _tiny_brats_run(root):
    """Like test_evaluate.build_tiny_run, for BraTS 2018 regions (whole tumour, core,
    enhancing): real records of a fake release, a tiny supervised U-Net with random weights."""
    import dataclasses

    import keras

    from preprocessing import PreprocessConfig, run_preprocessing
    from test_regions import write_brats2018
    from tfseg.data.pipeline import load_manifest
    from tfseg.data.spec import DataSpec
    from tfseg.datasets import get_dataset
    from tfseg.methods.supervised import Config
    from tfseg._files import write_json_atomic
    from tfseg.run import PREDICTOR_WEIGHTS, build_predictor

    data_dir = os.path.join(root, "MICCAI_BraTS_2018_Data_Training")
    cases = write_brats2018(data_dir, num_hgg=2, num_lgg_unlabeled=0)
    dataset = get_dataset("brats")
    records_dir, run_dir = os.path.join(root, "records"), os.path.join(root, "run")
    run_preprocessing(dataset, data_dir, records_dir, PreprocessConfig(n4=False),
                      dataset_options=dataset.options())
    spec = DataSpec.from_manifest(load_manifest(records_dir))
    config = {"method": "supervised", "dataset": "brats", "data_dir": data_dir,
              "method_config": dataclasses.asdict(Config(filters=(4, 8), batch_size=1,
                                                         steps=1, loss="ce")),
              "data_spec": dataclasses.asdict(spec), "dataset_options": dataset.options(),
              "records_dir": records_dir, "checkpoint_policy": "best_val",
              "split": {"name": "tiny", "labeled": [cases[0]], "unlabeled": [],
                        "val": [cases[0]], "test": list(cases)}}
    keras.utils.set_random_seed(0)
    weights = os.path.join(run_dir, PREDICTOR_WEIGHTS)  # random weights: any segmentation
    os.makedirs(os.path.dirname(weights))
    build_predictor(config)[0].save_weights(weights)
    write_json_atomic(os.path.join(run_dir, "config.json"), config)
    return run_dir, spec


def test_launch_evaluate_regions_montages_use_the_region_names(tmp_path):
    from launch import evaluate as launcher

    run_dir, spec = _tiny_brats_run(str(tmp_path))
    assert launcher.main(["launch.evaluate", f"--run_dir={run_dir}"]) == 0
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["targets"] == "regions" and summary["num_subjects"] == 2
    files = _overlay_files(run_dir)
    assert len(files) == 2 and all(n.startswith("dice") for n in files)
    page = check_page(os.path.join(run_dir, "report.html"))
    text = " ".join(page.text)
    for name in spec.region_names:
        assert f"Dice {name}" in text


def test_launch_predict_overlays_next_to_the_predictions(tmp_path):
    from launch import predict as predict_cli
    from test_evaluate import build_tiny_run
    from tfseg.export import export_run

    run = build_tiny_run(tmp_path, spatial_dims=2)
    export = export_run(run["run_dir"])
    scan = ",".join(os.path.join(run["data_dir"], "imagesTs", f"case9_{c:04d}.nii.gz")
                    for c in (0, 1))
    out = str(tmp_path / "predicted")
    assert predict_cli.main(["launch.predict", f"--model={export}", f"--input={scan}",
                             f"--output={out}", "--overlays"]) == 0
    assert sorted(os.listdir(out)) == ["case9_overlay.png", "case9_seg.nii.gz"]
    with open(os.path.join(out, "case9_overlay.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(os.path.join(out, "case9_overlay.png")) > 5000


# --------------------------------------------------------------------------- study page
def test_study_page_links_every_run_page_and_the_plots(tmp_path):
    from test_study import _fabricated_study
    from tfseg import study

    config, _ = _fabricated_study(tmp_path)
    specs = study.plan_runs(config, {})
    with_page = [s for s in specs if os.path.isfile(os.path.join(s.run_dir, "summary.json"))]
    for spec in with_page[:3]:
        with open(os.path.join(spec.run_dir, "report.html"), "w") as f:
            f.write("<html></html>")
    result = study.aggregate_study(config, specs)
    page = check_page(os.path.join(config.out_dir, "study.html"))
    links = [v for t, v in page.references if t == "a" and v.endswith("report.html")]
    assert sorted(links) == sorted(os.path.relpath(s.run_dir, config.out_dir) + "/report.html"
                                   for s in with_page[:3])
    images = [v for t, v in page.references if t == "img"]
    assert images == [result["plots"]["label_efficiency"],
                      *result["plots"]["boxplots"].values()]
    with open(os.path.join(config.out_dir, "study.md"), encoding="utf-8") as f:
        markdown = f.read()
    for link in links:
        assert f"]({link})" in markdown


def test_target_domain_section_links_its_own_files(tmp_path):
    import shutil

    run_dir, summary = _fabricated_run(tmp_path)
    target = os.path.join(run_dir, "target")
    os.makedirs(target)
    for name in ("summary.json", "summary.md", "metrics.csv"):
        shutil.copy(os.path.join(run_dir, name), target)
    shutil.copytree(os.path.join(run_dir, "overlays"), os.path.join(target, "overlays"))
    page = check_page(report_html.write_run_report(run_dir))
    images = [v for t, v in page.references if t == "img" and not v.startswith("data:")]
    assert images == ["overlays/dice0.300_p4.png", "overlays/dice0.850_p3.png",
                      "target/overlays/dice0.300_p4.png", "target/overlays/dice0.850_p3.png"]
    assert {("a", "#target-p4"), ("a", "target/metrics.csv")} <= set(page.references)
