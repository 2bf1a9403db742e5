import json
import os

import pytest

from tfseg.data import splits
from tfseg.datasets.base import Dataset

POOL = [f"patient{i:03d}" for i in range(1, 21)]  # 20 labeled patients
IMAGE_ONLY = ["extra01", "extra02", "extra03"]


def _parts(split):
    return {p: set(getattr(split, p)) for p in splits.PARTS}


def test_draw_is_deterministic_and_order_independent():
    first = splits.draw_split(POOL, IMAGE_ONLY, 3, seed=7)
    again = splits.draw_split(list(reversed(POOL)), IMAGE_ONLY[::-1], 3, seed=7)
    assert first == again
    assert first.seed == 7 and first.name == "labeled3_seed7"
    other = splits.draw_split(POOL, IMAGE_ONLY, 3, seed=8)
    assert _parts(first) != _parts(other)


def test_draw_is_disjoint_and_covers_everyone():
    split = splits.draw_split(POOL, IMAGE_ONLY, 4, seed=1)
    parts = _parts(split)
    # default sizes: test round(0.25 * 20) = 5, val round(0.1 * 20) = 2
    assert (len(parts["test"]), len(parts["val"]), len(parts["labeled"])) == (5, 2, 4)
    assert len(parts["unlabeled"]) == 20 - 5 - 2 - 4 + 3
    union = set().union(*parts.values())
    assert union == set(POOL) | set(IMAGE_ONLY)
    assert sum(len(v) for v in parts.values()) == len(union)  # pairwise disjoint
    assert set(IMAGE_ONLY) <= parts["unlabeled"]


def test_test_and_val_do_not_depend_on_num_labeled_and_labeled_sets_nest():
    drawn = [splits.draw_split(POOL, IMAGE_ONLY, n, seed=3) for n in (1, 3, 5)]
    assert len({d.test for d in drawn}) == 1
    assert len({d.val for d in drawn}) == 1
    assert set(drawn[0].labeled) < set(drawn[1].labeled) < set(drawn[2].labeled)


def test_test_seed_fixes_test_and_val_across_split_seeds():
    drawn = [splits.draw_split(POOL, IMAGE_ONLY, 2, seed=s, test_seed=5) for s in range(8)]
    assert len({d.test for d in drawn}) == 1 and len({d.val for d in drawn}) == 1
    assert len({d.labeled for d in drawn}) > 4  # the labeled draw still varies with the seed
    held = set(drawn[0].test) | set(drawn[0].val)
    for d in drawn:
        assert not held & set(d.labeled)
        assert set().union(*_parts(d).values()) == set(POOL) | set(IMAGE_ONLY)
    assert drawn[3].name == "labeled2_seed3_test5" and drawn[3].seed == 3
    # The held-out part is test_seed's permutation, exactly as a draw with that seed makes it.
    plain = splits.draw_split(POOL, IMAGE_ONLY, 2, seed=5)
    assert (drawn[0].test, drawn[0].val) == (plain.test, plain.val)
    # Labeled sets still nest across budgets at one seed, and the default is unchanged.
    nested = [splits.draw_split(POOL, [], n, seed=4, test_seed=5).labeled for n in (1, 3)]
    assert set(nested[0]) < set(nested[1])
    assert splits.draw_split(POOL, [], 2, seed=4, test_seed=None) == splits.draw_split(
        POOL, [], 2, seed=4)


def test_draw_explicit_sizes_and_tiny_pool_defaults():
    split = splits.draw_split(POOL, [], 2, seed=0, num_val=0, num_test=10)
    assert (len(split.test), len(split.val), len(split.labeled)) == (10, 0, 2)
    tiny = splits.draw_split(["a", "b", "c"], [], 1, seed=0)  # max(1, round(..)) = 1 each
    assert (len(tiny.test), len(tiny.val), len(tiny.labeled), len(tiny.unlabeled)) == (1, 1, 1, 0)


def test_draw_errors():
    with pytest.raises(ValueError, match=r"num_labeled=14 is too large: 20 labeled patients minus "
                                         r"5 test and 2 val leave 13"):
        splits.draw_split(POOL, [], 14, seed=0)
    with pytest.raises(ValueError, match="num_labeled must be >= 1"):
        splits.draw_split(POOL, [], 0, seed=0)
    with pytest.raises(ValueError, match="leave 0"):
        splits.draw_split(["a", "b"], [], 1, seed=0)


def test_patient_in_both_inputs_counts_as_labeled():
    split = splits.draw_split(["a", "b", "c", "d"], ["d", "e"], 1, seed=0)
    assert "e" in split.unlabeled
    assert sum("d" in getattr(split, p) for p in splits.PARTS) == 1


def test_save_load_round_trip_is_atomic(tmp_path):
    split = splits.draw_split(POOL, IMAGE_ONLY, 2, seed=5)
    path = tmp_path / "sub" / "mine.json"
    splits.save_split(split, str(path))
    assert os.listdir(path.parent) == ["mine.json"]  # no temporary file left behind
    assert splits.load_split(str(path)) == split
    assert json.loads(path.read_text())["labeled"] == list(split.labeled)
    # Readable by the group and others like any file the user writes (not mkstemp's 0600).
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_load_names_unnamed_split_after_file(tmp_path):
    path = tmp_path / "hand_made.json"
    path.write_text(json.dumps({"labeled": ["a"], "unlabeled": [], "val": ["b"], "test": ["c"]}))
    split = splits.load_split(str(path))
    assert split.name == "hand_made" and split.seed is None and split.labeled == ("a",)


@pytest.mark.parametrize("content, message", [
    ({"labeled": ["a"], "val": [], "test": []}, r"missing key\(s\) unlabeled"),
    ({"labeled": ["a"], "unlabeled": [], "val": [], "test": ["a"]},
     r"patient\(s\) a are in both labeled and test"),
    ({"labeled": ["a"], "unlabeled": ["v"], "val": ["v"], "test": []},
     "in both unlabeled and val"),
    ({"labeled": ["a", "a"], "unlabeled": [], "val": [], "test": []}, "more than once"),
    ({"labeled": "a", "unlabeled": [], "val": [], "test": []}, "must be a list"),
    ([1, 2], "expected a JSON object"),
])
def test_load_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        splits.load_split(str(path))
    assert str(path) in str(error.value)


def test_load_missing_and_invalid_json(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        splits.load_split(str(tmp_path / "none.json"))
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"{path}: not valid JSON"):
        splits.load_split(str(path))


def test_unlabeled_may_share_labeled_patients_on_purpose():
    split = splits.Split("own", labeled=["a"], unlabeled=["a", "b"], val=["c"], test=["d"])
    assert split.unlabeled == ("a", "b")


def test_validate_split():
    split = splits.Split("s", labeled=["a"], unlabeled=["u"], val=["b"], test=["c"])
    splits.validate_split(split, ["a", "b", "c"], ["a", "b", "c", "u"])
    with pytest.raises(ValueError, match=r"from.json: unknown patient id\(s\) zz"):
        splits.validate_split(splits.Split("s", ["a"], ["zz"], [], []), ["a"], ["a"],
                              source="from.json")
    with pytest.raises(ValueError, match=r"val patient\(s\) u have no label"):
        splits.validate_split(splits.Split("s", ["a"], [], ["u"], []), ["a"], ["a", "u"])
    with pytest.raises(ValueError, match="'labeled' is empty"):
        splits.validate_split(splits.Split("s", [], ["a"], [], []), ["a"], ["a"])


def _dataset():
    return Dataset(name="toy", modalities=("mr",), class_names=("bg", "fg"), label_values=(0, 1),
                   spatial_dims=2, published_splits={
                       "c1": {"labeled": ["a"], "unlabeled": ["u"], "val": ["b"], "test": ["c"]},
                       "c2": {"labeled": ["b"], "unlabeled": ["u"], "val": ["a"], "test": ["c"]}})


def test_published_split():
    split = splits.published_split(_dataset(), "c2")
    assert split == splits.Split("c2", ("b",), ("u",), ("a",), ("c",), None)
    with pytest.raises(ValueError, match="no published split 'c9'. Published: c1, c2"):
        splits.published_split(_dataset(), "c9")


def _manifest():
    subjects = {f"{p}_ES": {"patient_id": p, "labeled": p != "u"} for p in "abcdu"}
    subjects["a_frame5"] = {"patient_id": "a", "labeled": False}
    return {"subjects": subjects}


def test_patient_pools_and_resolve(tmp_path):
    assert splits.patient_pools(_manifest()) == (["a", "b", "c", "d"], ["u"])
    drawn = splits.resolve_split(_manifest(), num_labeled=1, seed=2)
    assert drawn == splits.draw_split(["a", "b", "c", "d"], ["u"], 1, 2)
    assert splits.resolve_split(_manifest(), _dataset(), published="c1").name == "c1"
    path = tmp_path / "s.json"
    splits.save_split(drawn, str(path))
    assert splits.resolve_split(_manifest(), path=str(path)) == drawn


def test_resolve_errors(tmp_path):
    with pytest.raises(ValueError, match="exactly one of .* got published, num_labeled"):
        splits.resolve_split(_manifest(), _dataset(), published="c1", num_labeled=1)
    with pytest.raises(ValueError, match="got none"):
        splits.resolve_split(_manifest())
    path = tmp_path / "s.json"
    splits.save_split(splits.Split("s", ["a"], ["ghost"], [], []), str(path))
    with pytest.raises(ValueError, match=rf"split file {path}: unknown patient id\(s\) ghost"):
        splits.resolve_split(_manifest(), path=str(path))


def test_fraction_counts_7_1_2():
    from tfseg.data.splits import fraction_counts

    # 20 patients: test 4, val 2, training 14; 10% -> round(1.4) = 1, 30% -> round(4.2) = 4
    assert fraction_counts(20, 0.1) == (1, 2, 4)
    assert fraction_counts(20, 0.3) == (4, 2, 4)
    assert fraction_counts(20, 1.0) == (14, 2, 4)
    assert fraction_counts(285, 0.1) == (20, 28, 57)   # BraTS 2018 training set
    assert fraction_counts(5, 0.1) == (1, 1, 1)        # at least one of each
    assert fraction_counts(20, 0.5, num_val=0, num_test=10) == (5, 0, 10)
    with pytest.raises(ValueError, match=r"labeled_fraction must be in \(0, 1\]"):
        fraction_counts(20, 0.0)
    with pytest.raises(ValueError, match="leave none for training"):
        fraction_counts(2, 0.5)
