"""What the hardware runs natively, and the mixed-precision choice that follows from it.

`--mixed_precision=auto` (launch.train, launch.benchmark, launch.study) resolves once, here:
bf16 compute (Keras' `mixed_bfloat16` policy: bfloat16 layers, float32 variables and losses)
where the hardware has native bf16 arithmetic, float32 ("none") elsewhere:

- GPUs: every visible GPU has compute capability >= 8.0 (Ampere and later);
- CPUs (no GPU visible): /proc/cpuinfo lists `avx512_bf16` or `amx_bf16` (Cooper Lake, Sapphire
  Rapids and later Xeons; Zen 4 and later).

Elsewhere bf16 is emulated and brings nothing or costs time (docs/performance.md). The request
and the resolved value are both recorded (config.json "mixed_precision", the benchmark's JSON).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable, Iterator, Sequence

MIXED_PRECISION = ("auto", "none", "bf16")
RESOLVED = ("none", "bf16")
# /proc/cpuinfo flags of native bf16 arithmetic (dot products / tile matmuls).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MIN_GPU_CAPABILITY = (8, 0)
_POLICIES = {"none": "float32", "bf16": "mixed_bfloat16"}


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """A resolved `--mixed_precision`.

    Attributes:
      requested: what was asked for: "auto" | "none" | "bf16".
      resolved: what runs: "none" (float32) | "bf16" (mixed_bfloat16).
      reason: one line saying why (the hardware facts `auto` looked at).
    """

    requested: str
    resolved: str
    reason: str

    @property
    def policy(self) -> str:
        """The Keras dtype policy name."""
        return _POLICIES[self.resolved]

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        return f"mixed precision {self.requested} -> {self.resolved} ({self.reason})"


def check_mixed_precision(value: str, setting: str = "--mixed_precision") -> str:
    """Returns `value` if it is a valid request.

    Raises:
      ValueError: naming the setting and the choices.
    """
    if value not in MIXED_PRECISION:
        raise ValueError(f"{setting}={value!r}; choose one of {', '.join(MIXED_PRECISION)} "
                         "(auto: bf16 where the hardware has native bf16, else none).")
    return value


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU feature flags of the first processor in `cpuinfo_path` (empty if unreadable,
    e.g. not Linux)."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def gpu_capabilities() -> list[tuple[int, int]]:
    """Compute capability (major, minor) of every GPU TensorFlow sees ((0, 0) if unknown)."""
    import tensorflow as tf

    capabilities = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device) or {}
        capability = details.get("compute_capability") or (0, 0)
        capabilities.append(tuple(int(v) for v in capability))
    return capabilities


def resolve_mixed_precision(requested: str, *, flags: Iterable[str] | None = None,
                            gpus: Sequence[tuple[int, int]] | None = None) -> PrecisionChoice:
    """Resolves a `--mixed_precision` request (module docstring).

    Args:
      requested: "auto" | "none" | "bf16".
      flags: CPU feature flags (default: this machine's /proc/cpuinfo).
      gpus: compute capabilities of the visible GPUs (default: TensorFlow's list).

    Raises:
      ValueError: for an unknown request.
    """
    check_mixed_precision(requested)
    if requested != "auto":
        return PrecisionChoice(requested, requested, "set explicitly")
    gpus = list(gpu_capabilities() if gpus is None else gpus)
    if gpus:
        shown = ", ".join(f"{major}.{minor}" for major, minor in gpus)
        if all(tuple(c) >= MIN_GPU_CAPABILITY for c in gpus):
            return PrecisionChoice("auto", "bf16", f"GPU compute capability {shown} >= 8.0")
        return PrecisionChoice("auto", "none", f"GPU compute capability {shown} < 8.0: no "
                                               "native bf16")
    flags = cpu_flags() if flags is None else frozenset(flags)
    native = [f for f in CPU_BF16_FLAGS if f in flags]
    if native:
        return PrecisionChoice("auto", "bf16", f"CPU has {' and '.join(native)}")
    return PrecisionChoice("auto", "none", f"CPU has none of {', '.join(CPU_BF16_FLAGS)}: "
                                           "bf16 would be emulated")


@contextlib.contextmanager
def precision_policy(choice: PrecisionChoice) -> Iterator[None]:
    """Sets Keras' global dtype policy for `choice` (build the networks inside), then restores
    the previous one."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(choice.policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
