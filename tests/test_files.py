"""tfseg._files: the one atomic-write helper (text, JSON, any writer through `atomic_path`)."""
from __future__ import annotations

import json
import os

import pytest

from tfseg import _files


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_text_write_overwrites_with_usual_permissions_and_leaves_no_temporary(tmp_path,
                                                                           umask_027):
    path = tmp_path / "new" / "folder" / "notes.txt"         # folders are created
    _files.write_text_atomic(str(path), "first\n")
    _files.write_text_atomic(str(path), "second ü\n")
    assert path.read_text(encoding="utf-8") == "second ü\n"
    assert os.listdir(path.parent) == ["notes.txt"]
    assert _mode(path) == 0o666 & ~umask_027 == 0o640         # not mkstemp's 0600


def test_default_umask_gives_0666_minus_umask(tmp_path):
    path = tmp_path / "a.txt"
    _files.write_text_atomic(str(path), "x")
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(path) == 0o666 & ~umask


def test_crash_mid_write_keeps_previous_file_and_removes_temporary(tmp_path):
    path = tmp_path / "state.json"
    _files.write_text_atomic(str(path), "previous\n")
    # The lone surrogate cannot be encoded in UTF-8: the write itself fails.
    with pytest.raises(UnicodeEncodeError):
        _files.write_text_atomic(str(path), "x" * 100_000 + "\udc80")
    assert path.read_text() == "previous\n"
    assert os.listdir(tmp_path) == ["state.json"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_path_failing_writer_keeps_previous_file(tmp_path, error):
    path = tmp_path / "image.png"
    path.write_bytes(b"old")
    with pytest.raises(error):
        with _files.atomic_path(str(path)) as temporary:
            with open(temporary, "wb") as stream:
                stream.write(b"half")
            raise error("killed")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["image.png"]


def test_crash_before_the_rename_removes_temporary(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    _files.write_text_atomic(str(path), "a\n")

    def no_rename(source, target):
        raise OSError("disk gone")

    monkeypatch.setattr(_files.os, "replace", no_rename)
    with pytest.raises(OSError, match="disk gone"):
        _files.write_text_atomic(str(path), "b\n")
    assert path.read_text() == "a\n" and os.listdir(tmp_path) == ["log.csv"]


def test_temporary_is_hidden_beside_the_file_with_the_suffix(tmp_path):
    path = tmp_path / "best.weights.h5"
    with _files.atomic_path(str(path), suffix=".weights.h5") as temporary:
        name = os.path.basename(temporary)
        assert os.path.dirname(temporary) == str(tmp_path)
        assert name.startswith(_files.temporary_prefix("best.weights.h5"))
        assert name.startswith(".best.weights.h5.tmp-") and name.endswith(".weights.h5")
        assert os.path.getsize(temporary) == 0               # created empty, for the writer
        with open(temporary, "wb") as stream:
            stream.write(b"w")
    assert path.read_bytes() == b"w" and os.listdir(tmp_path) == ["best.weights.h5"]


def test_json_round_trip_and_formats(tmp_path):
    data = {"b": [1, 2.5, None, True], "a": {"ü": "ß", "nested": {"x": [[]]}}}
    path = tmp_path / "data.json"
    _files.write_json_atomic(str(path), data)
    assert json.loads(path.read_text(encoding="utf-8")) == data
    assert path.read_text() == json.dumps(data, indent=2) + "\n"   # key order kept
    _files.write_json_atomic(str(path), data, indent=1, sort_keys=True)
    assert path.read_text() == json.dumps(data, indent=1, sort_keys=True) + "\n"
    assert list(json.loads(path.read_text())) == ["a", "b"]
    with pytest.raises(TypeError):
        _files.write_json_atomic(str(path), {"path": tmp_path})  # not JSON without `default`
    assert json.loads(path.read_text()) == data                   # previous file intact
    _files.write_json_atomic(str(path), {"path": tmp_path}, default=str)
    assert json.loads(path.read_text()) == {"path": str(tmp_path)}
    assert os.listdir(tmp_path) == ["data.json"]


def test_save_weights_atomic_round_trip_and_failure(tmp_path):
    import keras
    import numpy as np

    from tfseg.callbacks import save_weights_atomic

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = tmp_path / "checkpoints" / "best.weights.h5"
    save_weights_atomic(model, str(path))
    saved = [w.copy() for w in model.get_weights()]
    model.set_weights([w + 1 for w in saved])

    def crash(target, overwrite=True):
        with open(target, "wb") as stream:
            stream.write(b"partial")
        raise RuntimeError("killed")

    original = model.save_weights
    model.save_weights = crash
    with pytest.raises(RuntimeError):
        save_weights_atomic(model, str(path))
    model.save_weights = original
    assert os.listdir(path.parent) == ["best.weights.h5"]
    model.load_weights(str(path))
    for restored, expected in zip(model.get_weights(), saved):
        np.testing.assert_array_equal(restored, expected)
