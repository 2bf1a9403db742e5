"""synthetic_brain: embedded 6-month infant brain phantoms (T1 + T2) in the iSEG-2017 layout.

What is generated (deterministically, `GENERATOR_VERSION`), under the folder `prepare` returns:

    iSeg-2017-Training/subject-{1..10}-{T1,T2,label}.hdr/.img    labeled
    iSeg-2017-Testing/subject-{11..16}-{T1,T2}.hdr/.img          unlabeled

as Analyze 7.5 pairs with the iSEG label values 0 (background), 10 (CSF), 150 (GM), 250 (WM),
so the iSEG reader (`ISegDataset`, which remaps them to classes 0..3) is what reads it.

Each volume is 64×80×64 voxels (x, y, z) at 1 mm, skull-stripped like iSEG (zero outside an
imperfect brain mask that keeps a thin, uneven rim of dura/skull, labeled background). Inside:
extra-axial CSF of varying width; a cortical GM ribbon 2.2–2.8 mm thick folded by sulci
(CSF-filled sheets along the zero set of a smooth random field, 5–8 mm deep, the GM ribbon lining
both walls); an interhemispheric fissure; WM with gyral cores; lateral and third ventricles
(CSF); deep GM nuclei (labeled GM). Subjects differ in head size and axes, orientation (±6°),
folding pattern and scale, ventricle size, cortical thickness and contrast.

Contrast is the isointense 6-month one: GM and WM differ by only ~3–4% in T1 (WM brighter) and
in T2 (WM darker) at the periphery, ~13% in the centrally myelinated WM; CSF is dark in T1 and
brightest in T2, so the two modalities complement each other. Then partial volume (exact edge
coverage per voxel), blur (σ 0.5 voxel), tissue texture, regional GM variation, a residual
smooth bias field per modality and Rician noise (GM SNR ~14–20), stored as int16.

Default geometry: 32³ patches on a stride-8 grid (iSEG's: 5×7×5 = 175 grid positions here), and a
labeled patch is kept when more than 40% of its voxels are brain (raw label > 0). The reference
6000/32768 = 18% was set for 144×192×256 volumes; the brain fills ~21% of these small ones, so
18% would keep 165–172 of the 175 patches, corner patches of mostly zeros included. 40% keeps
89–124 (mean 109) per training subject: the patches that hold tissue.

Not trivial (measured on the 10 training subjects, each volume scaled by its 2nd / 98th
percentiles as preprocessing does): the best intensity-only classifier — each cell of a 64×64
(T1, T2) histogram, over the whole training set, assigned its majority class: an oracle
two-channel threshold set fitted on the evaluation data itself — scores Dice CSF 0.91, GM 0.77,
WM 0.62 (mean 0.77); T1 alone 0.81 / 0.74 / 0.53, T2 alone 0.80 / 0.67 / 0.52. After N4 (shrink
4, this dataset's default) the WM separation collapses (0.92 / 0.76 / 0.06, mean 0.58): N4
flattens the smooth centre-to-periphery myelination gradient as it would on real isointense
data. Learning the spatial pattern (WM inside the ribbon, sulci, partial volume) is required.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from tfseg.datasets import _layout, _synthetic
from tfseg.datasets.iseg2017 import TESTING_FOLDER, TRAINING_FOLDER, ISegDataset

GENERATOR_VERSION = 1
NUM_TRAINING = 10
NUM_TESTING = 6
SIZE_XYZ = (64, 80, 64)
SPACING_XYZ = (1.0, 1.0, 1.0)
LABEL_VALUES = (0, 10, 150, 250)
_SEED = 20_170_614

# Mean intensities (T1, T2) of each tissue at 6 months; WM varies with myelination m in [0, 1].
_CSF, _GM, _DEEP_GM, _RIM = (0.20, 1.00), (0.55, 0.62), (0.60, 0.55), (0.25, 0.30)
_WM_UNMYELINATED, _WM_MYELINATED = (0.57, 0.60), (0.62, 0.54)


def draw_subject(rng: np.random.Generator) -> dict[str, Any]:
    """Draws one subject's anatomy and contrast (mm, radians)."""
    u = rng.uniform
    return {
        "icv_axes": (u(22.5, 25.5), u(29.5, 33.5), u(21.5, 24.5)),
        "base_flattening": u(0.8, 0.92),
        "centre": tuple(u(-1.5, 1.5, 3)),
        "angles": tuple(u(-0.1, 0.1, 3)),
        "fold_sigma": u(2.2, 2.8), "sulcus_width": u(0.9, 1.5), "sulcus_depth": u(5.0, 8.0),
        "cortex": u(2.2, 2.8), "extra_axial": u(0.8, 1.4),
        "fissure_width": u(1.2, 2.0), "fissure_depth": u(0.5, 0.6),
        "ventricle_scale": u(0.7, 1.4),
        "ventricles": (u(3.0, 5.0), u(1.8, 3.0), u(10, 14), u(2.5, 4.5), u(-8, -4), u(2, 6)),
        "deep_gm": (u(9, 12), u(-3, 3), u(-7, -3), u(4, 6), u(7, 10), u(5, 7)),
        "contrast_jitter": u(0.96, 1.04, (4, 2)),
        "noise": u(0.028, 0.04),
        "scale": (u(300, 600), u(400, 900)),
    }


def _rotation(angles: Sequence[float]) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _sheet_distance(field: np.ndarray) -> np.ndarray:
    """Distance (voxels = mm) to the zero set of a smooth field: |f| / |∇f|."""
    gz, gy, gx = np.gradient(field)
    return np.abs(field) / np.maximum(np.sqrt(gx * gx + gy * gy + gz * gz), 1e-3)


def render_subject(rng: np.random.Generator, p: Mapping[str, Any]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders (T1 int16, T2 int16, label uint8 with values 0/10/150/250), each (z, y, x)."""
    nx, ny, nz = SIZE_XYZ
    shape = (nz, ny, nx)
    grid = np.meshgrid(*((np.arange(n, dtype=np.float32) - (n - 1) / 2) for n in shape),
                       indexing="ij")  # z, y, x in mm from the volume centre
    rot = _rotation(p["angles"]).astype(np.float32)
    offset = [g - c for g, c in zip(grid[::-1], p["centre"])]  # x, y, z
    x, y, z = (sum(rot[i, j] * offset[j] for j in range(3)) for i in range(3))
    smooth = lambda sigma: _synthetic.smooth_noise(rng, shape, sigma)  # noqa: E731

    ax, ay, az = p["icv_axes"]
    az = np.where(z < 0, az * p["base_flattening"], az)
    icv = _synthetic.ellipsoid_signed_distance(x, y, z, (ax, ay, az)) + 1.2 * smooth(6.0)
    hull = icv - np.clip(p["extra_axial"] + 0.6 * smooth(5.0), 0.3, 3.0)
    folds = smooth(p["fold_sigma"])
    depth = p["sulcus_depth"] * np.clip(0.75 + 0.25 * smooth(6.0), 0.4, 1.2)
    sulci = _sheet_distance(folds)
    fissure = np.abs(x - 0.8 * smooth(8.0))
    fissure_depth = p["fissure_depth"] * p["icv_axes"][2]
    cortex = p["cortex"] + 0.3 * smooth(5.0)
    half_sulcus, half_fissure = p["sulcus_width"] / 2, p["fissure_width"] / 2
    sheets = np.maximum(np.minimum(half_sulcus - sulci, depth - hull),
                        np.minimum(half_fissure - fissure, fissure_depth - hull))
    ribbon = np.maximum.reduce([
        cortex - hull,
        np.minimum(half_sulcus + cortex - sulci, depth + cortex - hull),
        np.minimum(half_fissure + cortex - fissure, fissure_depth + cortex - hull)])
    vx, vw, vl, vh, vz, bend = p["ventricles"]
    scale = p["ventricle_scale"]
    ventricles = np.full(shape, -1e3, np.float32)
    for side in (-1, 1):
        zv = z - vz * 0.3 - bend * (y / vl) ** 2
        ventricles = np.maximum(ventricles, _synthetic.ellipsoid_signed_distance(
            x - side * vx, y, zv, (vw * scale, vl, vh * scale)))
    ventricles = np.maximum(ventricles, _synthetic.ellipsoid_signed_distance(
        x, y - 2, z - vz, (0.6 * scale, 6.0, 4.0)))
    dx, dy, dz, da, db, dc = p["deep_gm"]
    deep = np.maximum.reduce([_synthetic.ellipsoid_signed_distance(
        x - side * dx, y - dy, z - dz, (da, db, dc)) for side in (-1, 1)])
    rim = icv + np.clip(0.8 + 0.8 * smooth(5.0), 0.0, 2.5)

    # Myelination: central and posterior WM first.
    rho = np.sqrt((x / ax) ** 2 + (y / ay) ** 2 + (z / az) ** 2)
    myelin = np.clip((0.75 - rho) / 0.45 + 0.25 * y / ay + 0.2 * smooth(4.0), 0.0, 1.0)
    regional = 1.0 + 0.04 * smooth(6.0)  # cortical GM intensity varies by region
    jitter = p["contrast_jitter"]
    soft = lambda d: _synthetic.soft_inside(d, 1.0)  # noqa: E731
    masks = [(soft(ventricles), 1), (soft(deep), 2), (soft(-ribbon), 3), (soft(sheets), 1),
             (soft(hull), 2), (soft(icv), 1), (soft(rim), 0)]
    images = []
    for channel in range(2):
        csf = _CSF[channel] * jitter[0, channel]
        deep_gm = _DEEP_GM[channel] * jitter[1, channel]
        gm = _GM[channel] * jitter[2, channel] * regional
        wm = (_WM_UNMYELINATED[channel]
              + (_WM_MYELINATED[channel] - _WM_UNMYELINATED[channel]) * myelin) * jitter[3, channel]
        values = [csf, deep_gm, wm, csf, gm, csf, _RIM[channel]]
        image, fractions = _synthetic.composite(
            [(m, v, c) for (m, c), v in zip(masks, values)], num_classes=4)
        image = ndimage.gaussian_filter(image * (1 + 0.03 * smooth(1.0)), 0.5)
        bias = _synthetic.bias_field(rng, (x, y, z), extent_mm=35.0, log_std=0.08)
        image = _synthetic.rician_noise(rng, image * bias * p["scale"][channel],
                                        p["noise"] * p["scale"][channel])
        images.append(image)
    # Skull-stripped like iSEG: exactly zero outside the (imperfect) brain mask.
    inside = rim > 0
    label = np.asarray(LABEL_VALUES, np.uint8)[_synthetic.majority_label(fractions)]
    label[~inside] = 0
    t1, t2 = (_synthetic.to_int16(np.where(inside, image, 0.0)) for image in images)
    return t1, t2, label


# ---------------------------------------------------------------------------------------------
# Layout and published splits
# ---------------------------------------------------------------------------------------------

def _fewshot(num_labeled: int) -> dict[str, list[str]]:
    """The iSEG few-shot protocol on the default 10 + 6 subjects: labeled 1..n, val n+1, test
    the next 7, unlabeled = the testing subjects."""
    def subjects(*numbers: int) -> list[str]:
        return _layout.numbered("subject-", numbers)

    first_testing = NUM_TRAINING + 1
    return {"labeled": subjects(*range(1, num_labeled + 1)),
            "unlabeled": subjects(*range(first_testing, first_testing + NUM_TESTING)),
            "val": subjects(num_labeled + 1),
            "test": subjects(*range(num_labeled + 2, num_labeled + 9))}


PUBLISHED_SPLITS: dict[str, dict[str, list[str]]] = {
    "fewshot_n1": _fewshot(1),   # labeled 1, val 2, test 3..9
    "fewshot_n2": _fewshot(2),   # labeled 1-2, val 3, test 4..10
}


def write_subject(folder: str, number: int, labeled: bool) -> None:
    """Writes subject-N-{T1,T2[,label]}.hdr/.img into `folder` (Analyze 7.5 pairs)."""
    rng = _synthetic.subject_rng(_SEED, number)
    t1, t2, label = render_subject(rng, draw_subject(rng))
    stem = os.path.join(folder, f"subject-{number}-")
    _synthetic.write_analyze(t1, SPACING_XYZ, stem + "T1.hdr")
    _synthetic.write_analyze(t2, SPACING_XYZ, stem + "T2.hdr")
    if labeled:
        _synthetic.write_analyze(label, SPACING_XYZ, stem + "label.hdr")


def generate(folder: str, num_training: int = NUM_TRAINING, num_testing: int = NUM_TESTING
             ) -> None:
    """Writes the dataset into `folder`, non-atomically (`prepare` wraps it atomically).

    Subjects 1..num_training go to iSeg-2017-Training with labels, the next num_testing to
    iSeg-2017-Testing without.
    """
    training, testing = os.path.join(folder, TRAINING_FOLDER), os.path.join(folder, TESTING_FOLDER)
    os.makedirs(training, exist_ok=True)
    os.makedirs(testing, exist_ok=True)
    for number in range(1, num_training + 1):
        write_subject(training, number, labeled=True)
    for number in range(num_training + 1, num_training + num_testing + 1):
        write_subject(testing, number, labeled=False)


@dataclasses.dataclass(frozen=True)
class SyntheticBrainDataset(_synthetic.GeneratedDataset, ISegDataset):
    """iSEG-layout synthetic infant brains, read by the iSEG reader.

    `num_training` / `num_testing` shrink it (tests); testing subjects are numbered from
    num_training + 1, and subject N is the same whatever the counts.
    """

    name: str = "synthetic_brain"
    # See the module docstring: the reference 18% would keep every patch of these small volumes.
    min_foreground_fraction: float = 0.4
    published_splits: Mapping[str, Mapping[str, Sequence[str]]] = dataclasses.field(
        default_factory=lambda: PUBLISHED_SPLITS)
    default_split: str | None = "fewshot_n1"
    content_version: int | None = GENERATOR_VERSION
    num_training: int = NUM_TRAINING
    num_testing: int = NUM_TESTING

    cache_name = "synthetic_brain"
    generate_files = staticmethod(generate)


DATASET = SyntheticBrainDataset()
