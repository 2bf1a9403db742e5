"""launch.translate / tfseg.translate: a tiny two-domain `--method=cyclegan` run translates a
target scan (files or a dataset folder) back onto each scan's own geometry; clear one-line errors
for runs without a CycleGAN and for evaluating or exporting a translators-only run."""
from __future__ import annotations

import os

import numpy as np
import pytest

from launch import evaluate as evaluate_cli
from launch import export as export_cli
from launch import translate as translate_cli
from test_domains import two_domains  # noqa: F401  (fixture: tiny BraTS source + target)
from tfseg.io import read_image

TINY = ("generator_filters=4", "discriminator_filters=4", "residual_blocks=1",
        "gan_batch_size=2", "crop_size=16", "pool_size=4")


@pytest.fixture(scope="module")
def cyclegan_run(two_domains):
    from tfseg.train import TrainConfig, run_training

    root, source, target = two_domains
    summary = run_training(TrainConfig(
        method="cyclegan", dataset="brats", data_dir=source, records_root=str(root / "records"),
        run_dir=str(root / "cyclegan_run"), labeled=2, num_val=1, num_test=1, n4=False,
        verbose=0, target_dataset="brats", target_data_dir=target, steps=2, validation_every=2,
        overrides=TINY))
    assert summary["test"] is None and summary["export_path"] is None   # nothing to segment
    return summary["run_dir"], target


def _case(target):
    grade = os.path.join(target, "HGG")
    case = sorted(os.listdir(grade))[0]
    return case, [os.path.join(grade, case, f"{case}_{m}.nii.gz")
                  for m in ("t1", "t1ce", "t2", "flair")]


def test_translates_files_onto_their_own_geometry(cyclegan_run, tmp_path, capsys):
    run_dir, target = cyclegan_run
    case, files = _case(target)
    code = translate_cli.main(["launch.translate", f"--model={run_dir}",
                               f"--input={','.join(files)}", f"--output={tmp_path / 'out'}"])
    assert code == 0
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / "out" / f"{case}_t1_translated.nii.gz")]
    translated, meta = read_image(written[0])
    original, original_meta = read_image(files[0])
    assert translated.shape == (*original.shape, 4)              # one channel per modality
    assert meta.shape_zyx == original_meta.shape_zyx
    np.testing.assert_allclose(meta.spacing_xyz, original_meta.spacing_xyz)
    np.testing.assert_allclose(meta.origin_xyz, original_meta.origin_xyz)
    np.testing.assert_allclose(meta.direction, original_meta.direction)
    assert np.isfinite(translated).all()
    assert translated.min() >= -1.0 - 1e-5 and translated.max() <= 2.0 + 1e-5  # [-1, 2]
    assert np.abs(translated).max() > 0


def test_translates_a_dataset_folder_both_directions(cyclegan_run, tmp_path):
    from tfseg.translate import translate_inputs

    run_dir, target = cyclegan_run
    written = translate_inputs(run_dir, target, str(tmp_path / "t2s"), dataset_name="brats")
    assert len(written) == 6 and all(os.path.isfile(p) for p in written)   # 4 HGG + 2 LGG
    back = translate_inputs(run_dir, ",".join(_case(target)[1]), str(tmp_path / "s2t"),
                            direction="source_to_target")
    assert len(back) == 1 and read_image(back[0])[0].shape[-1] == 4


def test_runs_without_cyclegan_and_translator_runs_fail_in_one_line(cyclegan_run, tmp_path,
                                                                    capsys):
    import json

    run_dir, _ = cyclegan_run
    for cli, argv in ((evaluate_cli, [f"--run_dir={run_dir}"]),
                      (export_cli, [f"--run_dir={run_dir}"])):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["launch.x", *argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "trains image translators only" in err[0]
    other = tmp_path / "supervised_run"
    other.mkdir()
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    config.update(method="supervised", method_config={})
    with open(other / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(SystemExit):
        translate_cli.main(["launch.translate", f"--model={other}", "--input=x.nii.gz",
                            f"--output={tmp_path}"])
    assert "method supervised) has no CycleGAN" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        translate_cli.main(["launch.translate", f"--model={tmp_path / 'missing'}",
                            "--input=x.nii.gz", f"--output={tmp_path}"])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_exported_translator_serves_the_runs_translation(cyclegan_run, tmp_path, capsys):
    """launch.export --translator writes a SavedModel whose output equals the run's generator
    (odd sizes padded and cropped back); launch.translate reads it like the run folder, and
    refuses an export of the other direction."""
    from tfseg.io import read_image
    from tfseg.translate import load_translator

    run_dir, target = cyclegan_run
    assert export_cli.main(["launch.export", f"--run_dir={run_dir}",
                            "--translator=target_to_source"]) == 0
    export_dir = capsys.readouterr().out.split("Exported: ")[1].split()[0]
    assert export_dir.endswith(os.path.join("export", "brats_cyclegan_target_to_source", "1"))
    from_run, exported = load_translator(run_dir), load_translator(os.path.dirname(export_dir))
    assert exported.assets["kind"] == "translator" and exported.modalities == from_run.modalities
    images = np.random.default_rng(0).uniform(-0.2, 1.2, (2, 16, 20, 4)).astype(np.float32)
    np.testing.assert_allclose(exported.probabilities(images).numpy(),
                               from_run.probabilities(images).numpy(), atol=1e-5)
    # 13 x 18: padded with each image's background level to 16 x 20, cropped back.
    odd = images[:, :13, :18]
    padded = np.broadcast_to(odd.min(axis=(1, 2), keepdims=True), images.shape).copy()
    padded[:, :13, :18] = odd
    served = exported.probabilities(odd).numpy()
    assert served.shape == odd.shape
    np.testing.assert_allclose(served, from_run.probabilities(padded).numpy()[:, :13, :18],
                               atol=1e-5)
    case, files = _case(target)
    outputs = []
    for model, folder in ((run_dir, "by_run"), (export_dir, "by_export")):
        assert translate_cli.main(["launch.translate", f"--model={model}",
                                   f"--input={','.join(files)}",
                                   f"--output={tmp_path / folder}"]) == 0
        outputs.append(read_image(str(tmp_path / folder / f"{case}_t1_translated.nii.gz"))[0])
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4)
    with pytest.raises(SystemExit):
        translate_cli.main(["launch.translate", f"--model={export_dir}",
                            "--direction=source_to_target", f"--input={files[0]}",
                            f"--output={tmp_path / 'x'}"])
    assert "translates target_to_source, not source_to_target" in capsys.readouterr().err
    # A segmentation export (assets without "kind": "translator") is named as such.
    import json
    import shutil

    segmentation = tmp_path / "segmentation_export"
    shutil.copytree(export_dir, segmentation)
    assets_path = segmentation / "assets" / "preprocessing.json"
    assets = json.loads(assets_path.read_text())
    del assets["kind"]
    assets_path.write_text(json.dumps(assets))
    with pytest.raises(ValueError, match="is a segmentation export, not a translator"):
        load_translator(str(segmentation))
