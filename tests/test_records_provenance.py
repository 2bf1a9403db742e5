"""Records follow their inputs: a shard is reused only if it was made from the same files."""
import os
import time

import numpy as np
import pytest

from preprocessing import PreprocessConfig, runner
from preprocessing.config import records_dir
from tests.test_preprocessing import TinyDataset, make_tiny, phantom, write
from tfseg.data.pipeline import load_manifest, load_subject

NO_N4 = PreprocessConfig(n4=False)


def _preprocess(data, root):
    out = runner.preprocess_dataset(TinyDataset(), str(data), NO_N4, records_root=str(root))
    return out, load_manifest(out)


def test_an_edited_label_is_redone_and_a_touched_file_is_not(tmp_path):
    data = make_tiny(str(tmp_path / "data"), count=2)
    out, manifest = _preprocess(data, tmp_path / "records")
    entry = manifest["subjects"]["s0"]
    assert [os.path.basename(i["path"]) for i in entry["inputs"]] == [
        "image_0.nii.gz", "image_1.nii.gz", "label.nii.gz"]
    assert all(len(i["sha256"]) == 64 and i["size"] > 0 for i in entry["inputs"])
    _, before = load_subject(out, "s0")

    # Edit the label of s0: its background becomes class "outer" on one slice.
    _, label = phantom((4, 20, 18), seed=0, spacing_xyz=(1.0, 1.0, 5.0))
    label[0][label[0] == 0] = 10
    time.sleep(0.01)
    write(os.path.join(data, "s0", "label.nii.gz"), label, (1.0, 1.0, 5.0))
    summary = runner.run_preprocessing(TinyDataset(), data, out, NO_N4)
    assert summary.written == ("s0",) and summary.already_done == ("s1",)
    _, after = load_subject(out, "s0")
    assert (after[0] == 1).sum() > (before[0] == 1).sum()          # the new label is in the shard

    # Touching a file (a copy with new times) keeps the shard: the content hash is unchanged.
    path = os.path.join(data, "s1", "image_0.nii.gz")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    summary = runner.run_preprocessing(TinyDataset(), data, out, NO_N4)
    assert summary.written == () and set(summary.already_done) == {"s0", "s1"}


def test_records_made_before_inputs_were_recorded_are_redone(tmp_path):
    data = make_tiny(str(tmp_path / "data"), count=1)
    out, manifest = _preprocess(data, tmp_path / "records")
    del manifest["subjects"]["s0"]["inputs"]   # an older manifest
    import json
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    summary = runner.run_preprocessing(TinyDataset(), data, out, NO_N4)
    assert summary.written == ("s0",)


def test_two_data_folders_never_share_records(tmp_path):
    first = make_tiny(str(tmp_path / "site_a"), count=2)
    second = str(tmp_path / "site_b")
    os.makedirs(second)
    for sid in ("s0", "s1"):   # same case ids, other scans
        images, label = phantom((4, 20, 18), seed=10 + int(sid[1]), spacing_xyz=(1.0, 1.0, 5.0))
        for c, image in enumerate(images):
            write(os.path.join(second, sid, f"image_{c}.nii.gz"), image * 2.0, (1.0, 1.0, 5.0))
        write(os.path.join(second, sid, "label.nii.gz"), label, (1.0, 1.0, 5.0))
    out_a, manifest_a = _preprocess(first, tmp_path / "records")
    out_b, manifest_b = _preprocess(second, tmp_path / "records")
    assert out_a != out_b and os.path.dirname(out_a) == os.path.dirname(out_b)
    assert manifest_a["data_dir"] == os.path.abspath(first)
    assert manifest_b["data_dir"] == os.path.abspath(second)
    assert os.path.basename(out_a) == os.path.basename(records_dir(
        "r", "tiny", manifest_a["fingerprint"], first))
    # and re-running on the first folder reuses its own records untouched
    again, _ = _preprocess(first, tmp_path / "records")
    assert again == out_a


def test_train_refuses_records_of_another_data_folder(tmp_path):
    from tests.test_regions import write_brats2018
    from tfseg import train

    site_a, site_b = str(tmp_path / "a"), str(tmp_path / "b")
    write_brats2018(site_a, num_hgg=3, num_lgg_unlabeled=0, shape_zyx=(2, 8, 8))
    write_brats2018(site_b, num_hgg=3, num_lgg_unlabeled=0, shape_zyx=(2, 8, 8), seed=1)
    from tfseg.datasets import get_dataset
    records = runner.preprocess_dataset(get_dataset("brats"), site_a, NO_N4,
                                        records_root=str(tmp_path / "records"))
    config = train.TrainConfig(method="supervised", dataset="brats", data_dir=site_b,
                               records_dir=records)
    with pytest.raises(ValueError, match="were made from .*not from --data_dir"):
        train.resolve_records(config, get_dataset("brats"))
    same = train.TrainConfig(method="supervised", dataset="brats", data_dir=site_a,
                             records_dir=records)
    assert train.resolve_records(same, get_dataset("brats")) == records
    assert np.isfinite(load_subject(records, load_manifest(records)["subjects"].popitem()[0])[0]).all()


def test_complete_records_are_reused_without_writing(tmp_path, monkeypatch):
    """Training from records in a read-only folder: a complete, unchanged folder is not
    written to (root ignores permissions, so the test forbids the writes themselves)."""
    from preprocessing import writer

    data = make_tiny(str(tmp_path / "data"), count=2)
    out, _ = _preprocess(data, tmp_path / "records")

    def no_write(*args, **kwargs):
        raise AssertionError("the records folder was written to")

    monkeypatch.setattr(writer, "write_manifest", no_write)
    monkeypatch.setattr(writer, "write_shard", no_write)
    monkeypatch.setattr(runner, "check_writable", no_write)
    again, _ = _preprocess(data, tmp_path / "records")
    assert again == out


def test_unwritable_records_and_run_folders_are_named(tmp_path):
    from tfseg import train

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    data = make_tiny(str(tmp_path / "data"), count=1)
    with pytest.raises(ValueError, match=r"records folder .*file/tiny.*--records_root"):
        runner.preprocess_dataset(TinyDataset(), data, NO_N4, records_root=str(blocker))
    with pytest.raises(ValueError, match=r"run folder .*file/run is not writable.*--run_dir"):
        from tfseg._files import check_writable
        check_writable(str(blocker / "run"), "run folder", "pass a writable --run_dir")
    with open(train.__file__, encoding="utf-8") as f:
        assert "check_writable(run_dir" in f.read()


def test_train_allow_skips_trains_without_the_bad_subject(tmp_path, capsys):
    """A subject that cannot be read stops launch.train with advice that works: --allow_skips
    goes on without it and config.json lists it."""
    import json

    from launch import train as train_cli
    from tests.test_regions import write_brats2018

    data = str(tmp_path / "brats")
    cases = write_brats2018(data, num_hgg=5, num_lgg_unlabeled=0, shape_zyx=(2, 16, 16))
    bad = os.path.join(data, "HGG", cases[0], f"{cases[0]}_t2.nii.gz")
    with open(bad, "wb") as f:
        f.write(b"truncated")
    argv = ["launch.train", "--method=supervised", "--dataset=brats", f"--data_dir={data}",
            f"--records_root={tmp_path / 'records'}", f"--run_dir={tmp_path / 'run'}",
            "--labeled=2", "--num_val=1", "--num_test=1", "--steps=2", "--validation_every=2",
            "--non4", "--set=filters=4,8", "--set=batch_size=2", "--noexport", "--noevaluate"]
    with pytest.raises(SystemExit):
        train_cli.main(argv)
    assert "--allow_skips" in capsys.readouterr().err
    assert train_cli.main([*argv, "--allow_skips"]) == 0
    with open(tmp_path / "run" / "config.json") as f:
        config = json.load(f)
    assert list(config["skipped_subjects"]) == [cases[0]]
    assert cases[0] not in {p for part in config["split"].values() if isinstance(part, list)
                            for p in part}
