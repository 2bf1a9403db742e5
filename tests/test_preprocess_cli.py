"""launch/preprocess.py end to end on fake dataset layouts, including a run killed with SIGKILL."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import SimpleITK as sitk

from launch import preprocess
from preprocessing import writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, array, spacing):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, path)


def make_acdc(root, patients=3, shape=(5, 40, 44), spacing=(1.5, 1.5, 10.0)):
    """ACDC layout: training/patientNNN/{Info.cfg, patientNNN_frameYY[_gt].nii.gz}."""
    rng = np.random.default_rng(0)
    _, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    radius = np.hypot(y - shape[1] / 2, x - shape[2] / 2) / (min(shape[1:]) / 2)
    label = ((radius < 0.5).astype(np.uint8) + (radius < 0.35) + (radius < 0.2))
    for number in range(1, patients + 1):
        folder = os.path.join(root, "training", f"patient{number:03d}")
        os.makedirs(folder)
        with open(os.path.join(folder, "Info.cfg"), "w") as stream:
            stream.write("ED: 1\nES: 4\nGroup: NOR\nHeight: 170.0\nNbFrame: 10\nWeight: 70.0\n")
        for frame in (1, 4):
            image = (60 + 30 * label + rng.normal(0, 4, shape)) * (radius < 0.9)
            stem = os.path.join(folder, f"patient{number:03d}_frame{frame:02d}")
            _write(stem + ".nii.gz", image.astype(np.float32), spacing)
            _write(stem + "_gt.nii.gz", label, spacing)
    return root


def run(args, capsys=None):
    code = preprocess.main(["preprocess", *args])
    out = capsys.readouterr().out.strip().splitlines() if capsys else []
    return code, (out[-1] if out else None)


FAST = ["--n4=false", "--target_spacing=1.5", "--crop_size=32"]


def shas(folder):
    return {name: writer.sha256_file(os.path.join(folder, name))
            for name in sorted(os.listdir(folder)) if name.endswith(".tfrecord")}


def test_main_writes_records_under_the_fingerprint(tmp_path, capsys, caplog):
    data = make_acdc(str(tmp_path / "acdc"))
    root = str(tmp_path / "records")
    caplog.set_level(logging.INFO)
    code, out_dir = run(["--dataset=acdc", f"--data_dir={data}", f"--records_root={root}",
                         *FAST], capsys)
    assert code == 0 and os.path.dirname(out_dir) == os.path.join(root, "acdc")
    manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
    assert manifest["dataset_options"] == {"phase": "ES"}
    assert manifest["settings"]["crop_size_yx"] == [32, 32] and not manifest["settings"]["n4"]
    assert sorted(manifest["subjects"]) == ["patient001_ES", "patient002_ES", "patient003_ES"]
    assert manifest["subjects"]["patient002_ES"]["shape_zyx"] == [5, 32, 32]
    assert "[2/3] patient002_ES: 5 slices" in caplog.text
    assert "Done: 3 written, 0 skipped, 0 already done; 15 examples" in caplog.text
    # Same settings: nothing redone. Another phase: another folder.
    assert run(["--dataset=acdc", f"--data_dir={data}", f"--records_root={root}", *FAST],
               capsys) == (0, out_dir)
    assert "All 3 subjects of acdc are already in" in caplog.text  # and nothing was written
    code, ed_dir = run(["--dataset=acdc", f"--data_dir={data}", f"--records_root={root}",
                        "--phase=ED", *FAST], capsys)
    assert code == 0 and ed_dir != out_dir
    assert "patient001_ED" in json.load(open(os.path.join(ed_dir, "manifest.json")))["subjects"]


def test_bad_flags_and_layouts_exit_2_with_one_message(tmp_path, caplog):
    data = make_acdc(str(tmp_path / "acdc"), patients=1)
    (tmp_path / "empty").mkdir()
    cases = [
        (["--dataset=acdc", f"--data_dir={tmp_path / 'empty'}"], "the folder is empty"),
        (["--dataset=folder", f"--data_dir={data}"], "does not look like the folder dataset"),
        (["--dataset=folder", f"--data_dir={data}", "--phase=ES"], "--phase does not apply"),
        (["--dataset=nope"], "Unknown --dataset=nope"),
        (["--dataset=acdc", f"--data_dir={data}", "--crop_size=1,2,3"], "expected 2 numbers"),
        (["--dataset=acdc", f"--data_dir={data}", "--patch_size=8"], "2D slices"),
        (["--dataset=acdc", f"--data_dir={data}", "--num_shards=2", "--shard_index=2"],
         "shard_index"),
    ]
    for args, message in cases:
        caplog.clear()
        assert run(args)[0] == 2, args
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and message in errors[0].getMessage(), (args, caplog.text)
        assert "\n" not in errors[0].getMessage() and "Traceback" not in caplog.text


def test_empty_folder_from_the_shell_has_no_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "launch.preprocess", "--dataset=acdc",
         f"--data_dir={tmp_path / 'empty'}", f"--records_root={tmp_path / 'records'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 2
    assert "the folder is empty" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "records").exists()


def test_skipped_subject_exits_1_unless_allowed(tmp_path, capsys, caplog):
    data = make_acdc(str(tmp_path / "acdc"))
    bad = os.path.join(data, "training", "patient002", "patient002_frame04_gt.nii.gz")
    os.remove(bad)
    args = ["--dataset=acdc", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *FAST]
    code, printed = run(args, capsys)
    assert code == 1 and printed == str(tmp_path / "out")
    assert f"patient002_ES: Cannot read image {bad}: the file does not exist" in caplog.text
    assert "--allow_skips" in caplog.text
    manifest = json.load(open(tmp_path / "out" / "manifest.json", encoding="utf-8"))
    assert list(manifest["skipped"]) == ["patient002_ES"] and len(manifest["subjects"]) == 2
    assert run(args + ["--allow_skips"], capsys)[0] == 0


def test_machine_shards_merge_into_the_single_run(tmp_path, capsys):
    data = make_acdc(str(tmp_path / "acdc"), patients=4)
    base = ["--dataset=acdc", f"--data_dir={data}", *FAST]
    assert run(base + [f"--out_dir={tmp_path / 'one'}"])[0] == 0
    reference = shas(tmp_path / "one")
    assert len(reference) == 4
    # Two "machines", each with its own folder, then copied together and merged.
    for index in (0, 1):
        assert run(base + [f"--out_dir={tmp_path / f'm{index}'}", "--num_shards=2",
                           f"--shard_index={index}"])[0] == 0
        assert not (tmp_path / f"m{index}" / "manifest.json").exists()
    merged = tmp_path / "merged"
    merged.mkdir()
    for index in (0, 1):
        for name in os.listdir(tmp_path / f"m{index}"):
            os.replace(tmp_path / f"m{index}" / name, merged / name)
    capsys.readouterr()
    assert run([f"--out_dir={merged}", "--num_shards=2", "--merge_manifests"], capsys) == (
        0, str(merged / "manifest.json"))
    manifest = json.load(open(merged / "manifest.json", encoding="utf-8"))
    assert len(manifest["subjects"]) == 4 and shas(merged) == reference
    assert manifest["fingerprint"] == json.load(open(tmp_path / "one" / "manifest.json", encoding="utf-8"))[
        "fingerprint"]


def test_killed_run_leaves_no_partial_shard_and_resumes(tmp_path, capsys):
    """SIGKILL a real 2-worker run (parent and workers, as an OOM killer or a scheduler would)
    once a subject is recorded; the re-run must finish it with shards identical, byte for byte,
    to an uninterrupted single-process run (which also shows workers write the same shards)."""
    # Big enough slices that the run is still busy when the first subject is recorded.
    data = make_acdc(str(tmp_path / "acdc"), patients=12, shape=(12, 224, 224),
                     spacing=(1.0, 1.0, 8.0))
    args = ["--dataset=acdc", f"--data_dir={data}", "--n4=false", "--target_spacing=1.0",
            "--crop_size=224"]
    reference = tmp_path / "reference"
    assert run(args + [f"--out_dir={reference}"], capsys)[0] == 0
    out = tmp_path / "out"
    manifest_path = out / "manifest.json"
    with open(tmp_path / "log.txt", "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "launch.preprocess", *args, f"--out_dir={out}",
             "--workers=2"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": REPO}, start_new_session=True)
        deadline = time.monotonic() + 240
        try:
            while time.monotonic() < deadline and process.poll() is None:
                if manifest_path.exists() and json.load(open(manifest_path, encoding="utf-8"))["subjects"]:
                    break
                time.sleep(0.005)
            os.killpg(process.pid, signal.SIGKILL)  # its own session: only this run
        finally:
            process.wait()
    assert process.returncode == -signal.SIGKILL, open(tmp_path / "log.txt", encoding="utf-8").read()
    manifest = json.load(open(manifest_path, encoding="utf-8"))
    assert 1 <= len(manifest["subjects"]) < 12 and not manifest["complete"]
    # Every shard in place is complete: either recorded with its sha256, or renamed into place
    # just before the kill (then it must still read back completely).
    import tensorflow as tf
    for name in os.listdir(out):
        if not name.endswith(".tfrecord"):
            continue
        entry = manifest["subjects"].get(name[: -len(".tfrecord")])
        if entry is not None:
            assert writer.sha256_file(str(out / name)) == entry["sha256"]
        else:
            assert sum(1 for _ in tf.data.TFRecordDataset(str(out / name))) == 12
    done_before = set(manifest["subjects"])
    assert run(args + [f"--out_dir={out}"], capsys)[0] == 0
    manifest = json.load(open(manifest_path, encoding="utf-8"))
    assert manifest["complete"] and len(manifest["subjects"]) == 12
    assert sorted(os.listdir(out)) == sorted(os.listdir(reference))  # no temporaries left
    assert shas(out) == shas(reference)
    assert done_before <= set(manifest["subjects"])
