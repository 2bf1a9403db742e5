"""launch.train end to end: flags, kill -9 and resume, MirroredStrategy on 2 logical CPUs,
MultiWorkerMirroredStrategy with 2 local workers, and the real synthetic_cardiac pipeline.

Distributed tests run in subprocesses: logical devices and the multi-worker runtime must be set
up before TensorFlow initialises, which has already happened in the pytest process.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from launch import train as train_cli
from test_train import TINY, _log_rows, tiny_split_file, write_tiny_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _tiny_args(tmp_path, records, steps, validation_every, run="run"):
    return ["--method=supervised", "--dataset=synthetic_cardiac", f"--records_dir={records}",
            f"--split={tiny_split_file(str(tmp_path))}", f"--steps={steps}",
            f"--validation_every={validation_every}", *[f"--set={s}" for s in TINY],
            "--noevaluate", "--noexport", f"--run_dir={tmp_path / run}",
            f"--records_root={tmp_path / 'records_root'}"]


def _checksum(weights_path):
    """sha256 over every array of a .weights.h5 file, in key order."""
    import h5py

    digest = hashlib.sha256()
    with h5py.File(weights_path, "r") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset)
                     else None)
        for name in sorted(names):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(f[name][()]).tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- flags
def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["launch.train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("method", "dataset", "data_dir", "run_dir", "labeled", "split_seed", "split",
                 "steps", "validation_every", "preset", "set", "distribute", "mixed_precision",
                 "phase", "records_root", "n4", "records_dir", "seed"):
        assert re.search(rf"--(\[no\])?{name}: .*\n\s+\(default: ", out), name
    assert "(default: 'none')" in out and "(default: 'records')" in out


@pytest.mark.parametrize("argv, message", [
    (["--method=nope", "--dataset=synthetic_cardiac"],
     r"unknown --method=nope\. Available: .*supervised"),
    (["--method=supervised", "--dataset=nope"],
     r"unknown --dataset=nope\. Available: .*synthetic_cardiac"),
    (["--dataset=acdc"], r"--method is required"),
    (["--method=supervised", "--dataset=acdc", "--preset=huge"], r"Unknown preset 'huge'"),
    (["--method=supervised", "--dataset=acdc", "--set=filterz=1"], r"has no field 'filterz'"),
    (["--method=supervised", "--dataset=acdc", "--set=filters"], r"expected --set=name=value"),
    (["--method=supervised", "--dataset=acdc", "--distribute=tpu"], r"distribute"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["launch.train", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("launch.train: error: ")
    assert re.search(message, err)


def test_main_trains_and_prints_the_run_folder(tmp_path, capsys):
    records = write_tiny_records(str(tmp_path / "records"))
    assert train_cli.main(["launch.train", *_tiny_args(tmp_path, records, 4, 4)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Best validation mean Dice \d\.\d{4} at step 4\.", out)
    assert f"Run folder: {tmp_path / 'run'}" in out
    assert [int(r["step"]) for r in _log_rows(str(tmp_path / "run"))] == [4]


# --------------------------------------------------------------------------- kill and resume
def test_sigkill_then_rerun_resumes_where_it_stopped(tmp_path):
    records = write_tiny_records(str(tmp_path / "records"))
    args = [sys.executable, "-m", "launch.train", *_tiny_args(tmp_path, records, 40, 4)]
    rounds = tmp_path / "run" / "checkpoints" / "backup" / "0_train"
    first = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if rounds.is_dir() and any(not n.endswith(".tmp") for n in os.listdir(rounds)):
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert first.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    rows_before = _log_rows(str(tmp_path / "run"))

    second = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = re.search(r"Resuming stage train at step (\d+) \(optimizer iterations (\d+)\)",
                        second.stderr)
    assert resumed, second.stderr[-3000:]
    step, iterations = int(resumed[1]), int(resumed[2])
    assert 4 <= step < 40 and iterations == step  # optimizer state restored with the weights
    epochs = [int(e) for e in re.findall(r"Epoch (\d+)/10", second.stdout)]
    assert epochs == list(range(step // 4 + 1, 11))  # no restart from epoch 1
    rows = _log_rows(str(tmp_path / "run"))
    assert [int(r["step"]) for r in rows] == list(range(4, 41, 4))
    assert rows[:step // 4] == rows_before[:step // 4]  # the first run's rounds are kept
    with open(tmp_path / "run" / "checkpoints" / "progress.json", encoding="utf-8") as f:
        best = json.load(f)["best"]["0_train"]
    dices = [float(r["val_mean_dice"]) for r in rows]
    assert best["mean_dice"] == pytest.approx(max(dices), abs=1e-5)  # bookkeeping restored
    assert best["step"] == int(rows[int(np.argmax(dices))]["step"])


# --------------------------------------------------------------------------- distributed
_MIRRORED_SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tfseg import distribute
    from tfseg.methods import supervised
    from tfseg.methods.base import DataSpec
    from tfseg.train import TrainConfig, run_training

    spec = DataSpec(2, 1, 3, ("bg", "a", "b"), (16, 16))
    config = supervised.Config(filters=(4, 8), norm="none", batch_size=8, learning_rate=1e-2,
                               loss="dice_ce")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (32, 16, 16)).astype(np.int32)
    images = (labels[..., None] / 3 + rng.normal(0, 0.1, (32, 16, 16, 1))).astype(np.float32)
    data = tf.data.Dataset.from_tensor_slices(
        {"labeled": {"image": images, "label": labels},
         "unlabeled": {"image": images}}).batch(8).repeat()

    def train(strategy, initial):
        with strategy.scope():
            method = supervised.build(config, spec)
            method.compile()
            if initial is not None:
                method.set_weights(initial)
        start = [w.numpy().copy() for w in method.weights]
        history = method.fit(data, steps_per_epoch=3, epochs=2, verbose=0).history
        return method, start, history

    strategy = distribute.make_strategy("mirrored")
    single, start, single_history = train(tf.distribute.get_strategy(), None)
    mirrored, _, mirrored_history = train(strategy, start)
    diffs = [float(np.max(np.abs(a.numpy() - b.numpy())))
             for a, b in zip(single.weights, mirrored.weights)]
    moved = max(float(np.max(np.abs(a.numpy() - b))) for a, b in zip(single.weights, start))
    summary = run_training(TrainConfig(
        method="supervised", dataset="synthetic_cardiac", records_dir=sys.argv[1],
        split=sys.argv[2], run_dir=sys.argv[3], records_root=sys.argv[4], steps=4,
        validation_every=2,
        overrides=("filters=4,8", "batch_size=4", "norm=none"), distribute="mirrored",
        evaluate=False, export=False, verbose=0))
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "max_diff": max(diffs),
                      "moved": moved, "single": single_history, "mirrored": mirrored_history,
                      "best": summary["best_val_mean_dice"]}))
""")


def test_mirrored_two_replicas_match_one_device(tmp_path):
    records = write_tiny_records(str(tmp_path / "records"))
    result = subprocess.run(
        [sys.executable, "-c", _MIRRORED_SCRIPT, records, tiny_split_file(str(tmp_path)),
         str(tmp_path / "run"), str(tmp_path / "records_root")], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert out["moved"] > 1e-3  # training did change the weights...
    # ...the same way on 1 device and on 2 replicas. Not bit-identically: the two replicas'
    # gradients are summed in another order, and Adam turns a float32 rounding difference in a
    # gradient that is ~0 into an update difference of up to lr·sign (seen once: 4e-4 under
    # load, 1e-2 = lr here); a replica training on other data or a wrong reduction moves weights
    # by much more after 6 steps. The per-example losses below are compared tightly.
    assert out["max_diff"] < 2e-3
    # Losses are per-example means, identical however the batch is split. (The gradient norm
    # is per replica, of the replica's local mean loss, so it is not compared.)
    for term in ("loss", "dice_loss", "ce_loss"):
        np.testing.assert_allclose(out["mirrored"][term], out["single"][term], rtol=1e-4)
    with open(tmp_path / "run" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["num_replicas"] == 2
    assert 0.0 <= out["best"] <= 1.0


_WORKER_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)  # two workers share two cores
    from tfseg.train import TrainConfig, run_training
    summary = run_training(TrainConfig(
        method="supervised", dataset="synthetic_cardiac", records_dir=sys.argv[1],
        split=sys.argv[2], run_dir=sys.argv[3], records_root=sys.argv[4], steps=6,
        validation_every=3,
        overrides=("filters=4,8", "batch_size=4", "norm=none", "augment=mixup"),
        distribute="multi_worker", evaluate=False, export=False, verbose=0))
    print(json.dumps({"output_dir": summary["output_dir"], "best": summary["best_step"]}))
""")


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_two_local_workers_end_identical(tmp_path):
    records = write_tiny_records(str(tmp_path / "records"))
    split = tiny_split_file(str(tmp_path))
    run_dir = str(tmp_path / "run")
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    workers = [subprocess.Popen(
        [sys.executable, "-c", _WORKER_SCRIPT, records, split, run_dir,
         str(tmp_path / "records_root")], cwd=ROOT,
        env=_env(TF_CONFIG=json.dumps({"cluster": cluster,
                                       "task": {"type": "worker", "index": i}})),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    try:
        # Wait for both before judging either: the chief may finish a moment before the other.
        for worker in workers:
            results.append(worker.communicate(timeout=300))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    outputs = []
    for worker, (stdout, stderr) in zip(workers, results):
        assert worker.returncode == 0, stderr[-3000:]
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    chief, other = outputs
    assert chief["output_dir"] == run_dir and other["output_dir"] != run_dir
    assert chief["best"] == other["best"]
    sums = [_checksum(os.path.join(o["output_dir"], "checkpoints", "predictor.weights.h5"))
            for o in outputs]
    assert sums[0] == sums[1]
    assert os.path.isfile(os.path.join(run_dir, "config.json"))
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["num_replicas"] == 2
    assert [int(r["step"]) for r in _log_rows(run_dir)] == [3, 6]


# --------------------------------------------------------------------------- real pipeline
def test_synthetic_cardiac_end_to_end(tmp_path, capsys):
    """Generation (cached), preprocessing on first use, training, test evaluation in the
    original geometry and export, through `main(argv)` (N4 off to keep it fast)."""
    run_dir = tmp_path / "run"
    argv = ["launch.train", "--method=supervised", "--dataset=synthetic_cardiac", "--labeled=2",
            "--num_val=1", "--num_test=2", "--preset=quick", "--steps=4", "--validation_every=2",
            "--set=filters=4,8", "--set=batch_size=4", "--non4",
            f"--records_root={tmp_path / 'records'}", f"--run_dir={run_dir}"]
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    match = re.search(r"Test mean Dice (\d\.\d{4}) over 2 subjects \(rv (\d\.\d{4}), "
                      r"myocardium (\d\.\d{4}), lv (\d\.\d{4})\)\.", out)
    assert match, out
    with open(run_dir / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["split"] == "test" and summary["num_subjects"] == 2
    assert float(match[1]) == pytest.approx(summary["mean_dice"], abs=1e-4)
    assert summary["checkpoint"] == "best_val"
    with open(run_dir / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["train"]["n4"] is False and config["split"]["name"] == "labeled2_seed0"
    assert sorted(summary["subjects"]) == sorted(
        f"{p}_ES" for p in config["split"]["test"])  # only the test split was evaluated
    export = run_dir / "export" / "synthetic_cardiac_supervised" / "1"
    assert (export / "saved_model.pb").is_file()
    assert f"Exported: {export}" in out and f"Run folder: {run_dir}" in out
