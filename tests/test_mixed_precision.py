"""--mixed_precision=auto: the hardware rule (CPU flags and GPU capabilities mocked), the Keras
policy it sets, config.json of a training run, and the study's per-arm precision."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest

from tfseg import hardware

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse2 avx2 avx512f {extra}
bogomips\t: 4000.00

processor\t: 1
flags\t\t: fpu vme sse2 avx2 avx512f {extra}
"""


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
    ({"avx2", "amx_bf16", "amx_tile"}, "bf16"),
    ({"avx2", "avx512f", "avx512_vnni"}, "none"),   # AVX-512 without bf16: emulated
    (set(), "none"),
])
def test_auto_follows_the_cpu_flags_when_there_is_no_gpu(flags, expected):
    choice = hardware.resolve_mixed_precision("auto", flags=flags, gpus=[])
    assert (choice.requested, choice.resolved) == ("auto", expected)
    assert choice.policy == {"bf16": "mixed_bfloat16", "none": "float32"}[expected]
    if expected == "bf16":
        assert any(f in choice.reason for f in ("avx512_bf16", "amx_bf16"))
    else:
        assert "none of avx512_bf16, amx_bf16" in choice.reason


@pytest.mark.parametrize("gpus, expected", [
    ([(8, 0)], "bf16"), ([(9, 0), (8, 6)], "bf16"), ([(7, 5)], "none"),
    ([(8, 0), (7, 0)], "none"),   # every device must run it natively
    ([(0, 0)], "none"),           # capability unknown
])
def test_auto_follows_the_gpus_whatever_the_cpu(gpus, expected):
    choice = hardware.resolve_mixed_precision("auto", flags={"amx_bf16"}, gpus=gpus)
    assert choice.resolved == expected
    assert "GPU compute capability" in choice.reason


def test_explicit_requests_are_kept_and_bad_ones_name_the_setting():
    for value in ("none", "bf16"):
        choice = hardware.resolve_mixed_precision(value, flags=set(), gpus=[(7, 0)])
        assert (choice.requested, choice.resolved, choice.reason) == (value, value,
                                                                      "set explicitly")
    with pytest.raises(ValueError, match=r"--mixed_precision='fp16'; choose one of auto, none, "
                                         r"bf16"):
        hardware.resolve_mixed_precision("fp16")
    from tfseg.train import TrainConfig
    with pytest.raises(ValueError, match="mixed_precision='float16'"):
        TrainConfig(method="supervised", dataset="synthetic_cardiac", mixed_precision="float16")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra="amx_bf16 amx_tile"))
    assert hardware.cpu_flags(str(path)) == {"fpu", "vme", "sse2", "avx2", "avx512f", "amx_bf16",
                                             "amx_tile"}
    assert hardware.cpu_flags(str(tmp_path / "missing")) == frozenset()
    # The default reads the machine's flags (here mocked through cpu_flags).
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    assert hardware.resolve_mixed_precision("auto", gpus=[]).resolved == "none"
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert hardware.resolve_mixed_precision("auto", gpus=[]).resolved == "bf16"


def test_precision_policy_sets_and_restores_the_keras_policy():
    import keras

    before = keras.mixed_precision.global_policy().name
    choice = hardware.resolve_mixed_precision("auto", flags={"avx512_bf16"}, gpus=[])
    with hardware.precision_policy(choice):
        assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
        layer = keras.layers.Dense(2)
        layer.build((None, 3))
        assert layer.compute_dtype == "bfloat16" and layer.kernel.dtype == "float32"
    assert keras.mixed_precision.global_policy().name == before
    with pytest.raises(RuntimeError):
        with hardware.precision_policy(choice):
            raise RuntimeError("boom")
    assert keras.mixed_precision.global_policy().name == before


@pytest.mark.parametrize("flags, expected", [({"avx2"}, "none"), ({"amx_bf16"}, "bf16")])
def test_training_records_the_request_and_the_resolved_value(tmp_path, monkeypatch, flags,
                                                              expected):
    import keras
    from tests.test_train import train_config, write_tiny_records
    from tfseg.train import run_training

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(hardware, "gpu_capabilities", lambda: [])
    built = []
    import tfseg.methods.supervised as supervised
    original = supervised.build
    monkeypatch.setattr(supervised, "build", lambda *a: built.append(
        keras.mixed_precision.global_policy().name) or original(*a))
    records = write_tiny_records(str(tmp_path / "records"))
    config = train_config(tmp_path, records, mixed_precision="auto", steps=2,
                          validation_every=2)
    summary = run_training(config)
    with open(os.path.join(summary["run_dir"], "config.json")) as f:
        saved = json.load(f)
    assert saved["mixed_precision"]["requested"] == "auto"
    assert saved["mixed_precision"]["resolved"] == expected
    assert saved["train"]["mixed_precision"] == "auto"
    assert built == [{"none": "float32", "bf16": "mixed_bfloat16"}[expected]]
    assert keras.mixed_precision.global_policy().name == "float32"


def test_a_study_varies_the_precision_per_arm(tmp_path):
    from tfseg import study

    config = study.StudyConfig(dataset="synthetic_cardiac", methods=("fp32=supervised",
                                                                     "bf16=supervised"),
                               labeled=(1,), repeats=1, out_dir=str(tmp_path / "s"),
                               overrides=("mixed_precision=none", "filters=4,8",
                                          "bf16:mixed_precision=bf16"), baseline="fp32")
    per_arm = study.check_config(config)
    assert per_arm == {"fp32": ("mixed_precision=none", "filters=4,8"),
                       "bf16": ("mixed_precision=none", "filters=4,8",
                                "mixed_precision=bf16")}
    specs = {s.method: s for s in study.plan_runs(config, per_arm)}
    argv = specs["bf16"].train_argv(config)
    assert "--set=filters=4,8" in argv
    assert not any(a.startswith("--set=mixed_precision") for a in argv)
    # absl keeps the last value: the arm's own setting wins over the study-wide one.
    flags = [a for a in argv if a.startswith("--mixed_precision=")]
    assert flags == ["--mixed_precision=none", "--mixed_precision=bf16"]

    from launch import train as train_cli
    train_cli.FLAGS.unparse_flags()
    train_cli.FLAGS(["launch.train", *flags])
    assert train_cli.FLAGS.mixed_precision == "bf16"
    train_cli.FLAGS.unparse_flags()
    assert specs["fp32"].train_argv(config)[-2:] == ["--mixed_precision=none",
                                                     "--set=filters=4,8"]
    # The precision is part of the run's request (a changed precision is not resumed silently).
    assert "mixed_precision=bf16" in specs["bf16"].request(config)["overrides"]
    bad = study.StudyConfig(dataset="synthetic_cardiac", methods=("supervised",), labeled=(1,),
                            repeats=1, out_dir=str(tmp_path / "s"),
                            overrides=("supervised:mixed_precision=fp16",))
    with pytest.raises(ValueError, match=re.escape("--set=mixed_precision='fp16'")):
        study.check_config(bad)

def test_a_study_arm_can_train_with_another_seed(tmp_path):
    """`--set=ARM:seed_offset=K`: the same draw and split (--split_seed), training seed + K."""
    from tfseg import study

    config = study.StudyConfig(dataset="synthetic_cardiac", methods=(
        "fp32=supervised", "fp32s=supervised"), labeled=(1,), repeats=1,
        out_dir=str(tmp_path / "s"), overrides=("fp32s:seed_offset=1000",), baseline="fp32")
    per_arm = study.check_config(config)
    specs = {s.method: s for s in study.plan_runs(config, per_arm)}
    plain, shifted = specs["fp32"].train_argv(config), specs["fp32s"].train_argv(config)
    seed = specs["fp32"].seed
    assert f"--seed={seed}" in plain and f"--split_seed={seed}" in plain
    assert f"--seed={seed + 1000}" in shifted and f"--split_seed={seed}" in shifted
    assert not any("seed_offset" in a for a in shifted)
    bad = dataclasses.replace(config, overrides=("fp32s:seed_offset=one",))
    with pytest.raises(ValueError, match="seed_offset='one': an integer"):
        study.check_config(bad)


def test_launch_study_mixed_precision_flag_reaches_every_run(tmp_path, capsys):
    from launch import study as study_cli

    out = str(tmp_path / "study")
    with pytest.raises(SystemExit) as exit_info:
        study_cli.main(["launch.study", "--dataset=synthetic_cardiac", "--methods=supervised",
                        "--labeled=1", "--mixed_precision=fp16", f"--out={out}"])
    assert exit_info.value.code == 2
    assert "--mixed_precision" in capsys.readouterr().err
    assert study_cli.main(["launch.study", "--dataset=synthetic_cardiac",
                           "--methods=supervised", "--labeled=1", "--repeats=1",
                           "--mixed_precision=bf16", f"--out={out}", "--aggregate_only"]) == 0
    with open(os.path.join(out, "study.json")) as f:
        assert json.load(f)["arm_overrides"]["supervised"] == ["mixed_precision=bf16"]
