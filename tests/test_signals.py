"""No orphaned workers: SIGTERM, SIGINT or SIGKILL of `launch.preprocess --workers=2` stops its
worker processes too (and the multiprocessing resource tracker with them)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.test_regions import write_brats2018

# Spawning workers that import SimpleITK takes ~10 s per case on 2 cores: CI's slow suite.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("signals") / "brats")
    write_brats2018(root, num_hgg=8, num_lgg_unlabeled=0, shape_zyx=(24, 96, 96))
    return root


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_stopping_the_parent_stops_the_workers(slow_data, tmp_path, signum):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    parent = subprocess.Popen(
        [sys.executable, "-m", "launch.preprocess", "--dataset=brats", f"--data_dir={slow_data}",
         f"--records_root={tmp_path / 'records'}", "--workers=2"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = []
    deadline = time.time() + 120
    while time.time() < deadline and parent.poll() is None:
        workers = _children(parent.pid)
        if len(workers) >= 3:  # two workers and the resource tracker
            break
        time.sleep(0.2)
    assert len(workers) >= 2, "the workers never started"
    time.sleep(1.0)  # the workers are inside a subject now
    parent.send_signal(signum)
    _, stderr = parent.communicate(timeout=60)
    if signum == signal.SIGTERM:
        assert parent.returncode == 128 + signal.SIGTERM, stderr
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    assert not [p for p in workers if _alive(p)], f"orphaned after signal {signum}"
