"""synthetic_tumor: embedded glioma phantoms in two domains, for the tumour methods (SegAN, DMNet,
CycleGAN + MixMatch) when no BraTS download is at hand.

What is generated (deterministically, `GENERATOR_VERSION`) under the folder `prepare` returns:

    source/HGG/Brats18_SYN_NNN_1/Brats18_SYN_NNN_1_{t1,t1ce,t2,flair,seg}.nii.gz   labeled
    source/LGG/Brats18_SYN_NNN_1/...                                               labeled
    source/Validation/Brats18_SYNV_NNN_1/Brats18_SYNV_NNN_1_{t1,t1ce,t2,flair}.nii.gz  unlabeled
    target/dataset.json, imagesTr/ + labelsTr/ (a few labeled cases), imagesUnl/ (unlabeled),
           imagesTs/ + labelsTs/ (labeled evaluation cases)                          folder layout

The source domain is written in the BraTS 2018 layout and read by the BraTS reader
(`--dataset=synthetic_tumor`, options as `--dataset=brats`: `target`, `modalities`, `protocol`);
the target domain (`--dataset_option=domain=target`, or `--target_dataset=synthetic_tumor
--target_option=domain=target`) in the nnU-Net folder layout, read by the folder reader, with
the same modalities (t1, t1ce, t2, flair) and label values (0/1/2/4), so both domains share one
class and region set.

Anatomy (per subject): a skull-stripped brain (ellipsoid with a smoothly perturbed surface),
extra-axial CSF, a cortical grey-matter ribbon, white matter, lateral ventricles, and small
unlabeled white-matter hyperintensities (bright in T2/FLAIR like oedema: intensity alone cannot
separate them from tumour). One glioma per subject, placed anywhere in the brain at least 12 mm
inside its surface:
  - high grade (about 70%): an irregular enhancing rim (label 4, 2–5 mm) around a necrotic core
    (label 1), inside peritumoral oedema (label 2) reaching 6–18 mm beyond the rim;
  - low grade: a non-enhancing core (label 1) with a thin oedema margin, no enhancement.
Mass effect pushes the surrounding anatomy (ventricles, cortex) away from the lesion. Tumour size
(core radius 8–20 mm, whole tumour typically 20–120 cm³ as in BraTS), shape, texture and
contrast vary per subject.

Image formation: tissue intensities per modality (T1: WM > GM > CSF, the necrotic core dark;
T1c: enhancing rim brightest; T2: CSF and oedema bright; FLAIR: CSF suppressed, oedema
brightest), per-subject contrast jitter, tissue texture, partial volume at every boundary (the
exact edge coverage per voxel), blur, a smooth multiplicative bias field per modality and Rician
noise, stored as int16 and zero outside the brain (skull-stripped like BraTS).

Domains:
  - source: 2.0 x 2.0 x 2.5 mm voxels (88 x 88 x 52), blur 0.5 voxel, SNR ~ 25;
  - target: another scanner and protocol: 2.6 x 2.6 x 4.0 mm voxels (68 x 68 x 34), blur 1
    voxel, twice the noise, a stronger bias field, different contrasts (T1 with less grey/white
    contrast, FLAIR with incomplete CSF suppression, weaker enhancement) and a gamma curve.
Both are processed as 2D axial slices at 2 mm in-plane, centre-cropped to 80 x 80, so models of
one domain run on the other. N4 is not applied (`n4_default=False`): the tumour papers used
BraTS as distributed, without bias correction, so the methods must cope with the residual
bias field; it also keeps the quick presets quick (N4 of 4 modalities per subject costs more
than a quick training run here).

Counts (defaults): source 16 labeled (11 HGG, 5 LGG) + 8 unlabeled; target 4 labeled (imagesTr)
+ 12 unlabeled (imagesUnl) + 8 labeled evaluation cases (imagesTs + labelsTs).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from tfseg.datasets import _synthetic, brats, folder as folder_lib

GENERATOR_VERSION = 2
NUM_TRAINING = 16      # source, labeled
NUM_TESTING = 8        # source, unlabeled (validation download, no seg)
NUM_TARGET_LABELED = 4
NUM_TARGET_UNLABELED = 12
NUM_TARGET_TEST = 8
DOMAINS = ("source", "target")
_SEED = 20_180_901
_TARGET_SEED = 20_180_902

# Tissue classes used while rendering (the label file holds BraTS values, see _LABEL_OF).
_BG, _CSF, _GM, _WM, _WMH, _NECROTIC, _OEDEMA, _ENHANCING = range(8)
_LABEL_OF = np.array([0, 0, 0, 0, 0, 1, 2, 4], np.uint8)
# Mean intensity per tissue (rows as above, background unused) and modality (t1, t1ce, t2, flair).
_SOURCE_CONTRAST = np.array([
    [0.00, 0.00, 0.00, 0.00],
    [0.30, 0.32, 1.00, 0.12],   # CSF
    [0.62, 0.63, 0.62, 0.62],   # grey matter
    [0.85, 0.86, 0.45, 0.50],   # white matter
    [0.70, 0.71, 0.80, 0.88],   # white-matter hyperintensity (unlabeled)
    [0.40, 0.42, 0.95, 0.68],   # necrotic / non-enhancing core
    [0.58, 0.60, 0.86, 0.95],   # oedema
    [0.64, 1.25, 0.70, 0.80],   # enhancing tumour
], np.float32)
_TARGET_CONTRAST = np.array([
    [0.00, 0.00, 0.00, 0.00],
    [0.38, 0.40, 0.90, 0.35],   # FLAIR with incomplete CSF suppression
    [0.66, 0.66, 0.68, 0.70],
    [0.78, 0.78, 0.52, 0.58],   # less grey/white contrast
    [0.72, 0.73, 0.78, 0.85],
    [0.48, 0.50, 0.88, 0.74],
    [0.62, 0.64, 0.80, 0.90],
    [0.66, 1.02, 0.72, 0.82],   # weaker enhancement
], np.float32)


@dataclasses.dataclass(frozen=True)
class Domain:
    """Acquisition of one domain."""

    size_xyz: tuple[int, int, int]
    spacing_xyz: tuple[float, float, float]
    contrast: np.ndarray
    blur_vox: float
    noise: float           # Rician sigma relative to white matter in T1
    bias_log_std: float
    gamma: float


SOURCE = Domain((88, 88, 52), (2.0, 2.0, 2.5), _SOURCE_CONTRAST, 0.5, 0.035, 0.10, 1.0)
TARGET = Domain((68, 68, 34), (2.6, 2.6, 4.0), _TARGET_CONTRAST, 1.0, 0.07, 0.18, 0.8)


def draw_subject(rng: np.random.Generator, high_grade: bool) -> dict[str, Any]:
    """Draws one subject's anatomy, lesion and contrast (mm)."""
    u = rng.uniform
    axes = (u(54, 62), u(66, 74), u(48, 54))
    # Tumour centre: uniform in the brain, at least 12 mm inside its surface.
    while True:
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        radius = u(0, 1) ** (1 / 3)
        centre = direction * radius * (np.array(axes) - 12.0)
        if np.linalg.norm(centre[:2]) > 6.0:  # not on the midline ventricles
            break
    core = u(8.0, 20.0) if high_grade else u(10.0, 20.0)
    return {
        "axes": axes, "shift": tuple(u(-3, 3, 3)), "angle": u(-0.12, 0.12),
        "cortex": u(2.5, 3.5), "extra_axial": u(1.0, 2.0),
        "ventricles": (u(4.0, 7.0), u(2.5, 4.0), u(14, 20), u(5.0, 8.0)),
        "wmh": [(tuple(rng.normal(0, 1, 3) * np.array(axes) * 0.35), u(1.5, 3.5))
                for _ in range(int(rng.integers(1, 5)))],
        "high_grade": bool(high_grade), "centre": tuple(float(c) for c in centre),
        "core": core, "rim": u(2.0, 5.0),
        "oedema": u(6.0, 18.0) if high_grade else u(3.0, 10.0),
        "irregularity": u(0.1, 0.25), "mass_effect": u(0.3, 0.6),
        "contrast_jitter": u(0.92, 1.08, (8, 4)), "tumour_texture": u(0.03, 0.08),
        "scale": tuple(u(300, 900, 4)),
    }


def render_subject(rng: np.random.Generator, p: Mapping[str, Any], domain: Domain
                   ) -> tuple[list[np.ndarray], np.ndarray]:
    """Renders the four modalities (int16) and the BraTS label map (uint8), each (z, y, x)."""
    nx, ny, nz = domain.size_xyz
    sx, sy, sz = domain.spacing_xyz
    shape = (nz, ny, nx)
    z, y, x = np.meshgrid(*((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s
                            for n, s in ((nz, sz), (ny, sy), (nx, sx))), indexing="ij")
    sigma_vox = lambda mm: tuple(mm / s for s in (sz, sy, sx))  # noqa: E731
    smooth = lambda mm: _synthetic.smooth_noise(rng, shape, sigma_vox(mm))  # noqa: E731
    voxel_mm = min(sx, sy)
    soft = lambda d: _synthetic.soft_inside(d, voxel_mm)  # noqa: E731

    # Tumour geometry in scanner coordinates.
    cx, cy, cz = (c + s for c, s in zip(p["centre"], p["shift"]))
    dx, dy, dz = x - cx, y - cy, z - cz
    r = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
    bumps = 1.0 + p["irregularity"] * np.clip(smooth(8.0), -1.5, 1.5)
    core_d = p["core"] * bumps - r                               # > 0 inside the core
    outer = p["core"] + p["oedema"]
    oedema_d = outer * (1.0 + 1.6 * p["irregularity"] * np.clip(smooth(10.0), -1.5, 2.0)) - r

    # Mass effect: anatomy at x is read from a point pulled towards the tumour centre.
    push = p["mass_effect"] * p["core"] * np.exp(-(r / (2.5 * p["core"])) ** 2)
    ax_, ay_, az_ = (d * (1.0 - push / r) for d in (dx, dy, dz))
    angle = p["angle"]
    bx = (ax_ + cx) * np.cos(angle) - (ay_ + cy) * np.sin(angle)
    by = (ax_ + cx) * np.sin(angle) + (ay_ + cy) * np.cos(angle)
    bz = az_ + cz

    brain = _synthetic.ellipsoid_signed_distance(bx, by, bz, p["axes"]) + 1.5 * smooth(12.0)
    hull = brain - p["extra_axial"]
    cortex = hull - p["cortex"] * (1.0 + 0.15 * smooth(6.0))
    vx, vw, vl, vh = p["ventricles"]
    ventricles = np.maximum.reduce([_synthetic.ellipsoid_signed_distance(
        bx - side * vx, by, bz - 4.0, (vw, vl, vh)) for side in (-1, 1)])
    wmh = np.full(shape, -1e3, np.float32)
    for (hx, hy, hz), radius in p["wmh"]:
        wmh = np.maximum(wmh, radius * (1.0 + 0.3 * smooth(3.0))
                         - np.sqrt((bx - hx) ** 2 + (by - hy) ** 2 + (bz - hz) ** 2))

    inside_brain = np.minimum(oedema_d, brain)  # the lesion never leaves the brain
    if p["high_grade"]:
        necrosis_d = core_d - p["rim"] * (1.0 + 0.3 * smooth(4.0))
        tumour = [(soft(necrosis_d), _NECROTIC), (soft(core_d), _ENHANCING)]
    else:
        tumour = [(soft(core_d), _NECROTIC)]
    # Painter's order, top layer first: the lesion, then the ventricles it pushes aside, then
    # oedema (which never fills the ventricles), then the normal tissues.
    layers = tumour + [(soft(ventricles), _CSF), (soft(inside_brain), _OEDEMA),
                       (soft(np.minimum(wmh, cortex)), _WMH), (soft(cortex), _WM),
                       (soft(hull), _GM), (soft(brain), _CSF)]
    fractions = np.zeros((8,) + shape, np.float32)
    remaining = np.ones(shape, np.float32)
    for mask, tissue in layers:
        weight = mask * remaining
        fractions[tissue] += weight
        remaining *= 1.0 - mask
    fractions[_BG] += remaining

    contrast = domain.contrast * p["contrast_jitter"]
    texture = 1.0 + p["tumour_texture"] * smooth(3.0)
    tumour_fraction = fractions[_NECROTIC] + fractions[_OEDEMA] + fractions[_ENHANCING]
    images = []
    for channel in range(4):
        image = np.tensordot(contrast[:, channel], fractions, axes=1)
        image *= 1.0 + 0.03 * smooth(2.0) + (texture - 1.0) * tumour_fraction
        image = ndimage.gaussian_filter(image, domain.blur_vox)
        if domain.gamma != 1.0:
            image = np.clip(image, 0, None) ** domain.gamma
        bias = _synthetic.bias_field(rng, (x, y, z), extent_mm=70.0, log_std=domain.bias_log_std)
        scale = p["scale"][channel]
        image = _synthetic.rician_noise(rng, image * bias * scale, domain.noise * scale)
        images.append(image)
    label = _LABEL_OF[_synthetic.majority_label(fractions)]
    skull_stripped = fractions[_BG] < 0.5
    label[~skull_stripped] = 0
    images = [_synthetic.to_int16(np.where(skull_stripped, image, 0.0)) for image in images]
    return images, label


def _subject(seed: int, number: int, domain: Domain, high_grade: bool | None = None
             ) -> tuple[list[np.ndarray], np.ndarray]:
    """Subject `number` of a domain; its grade is drawn (70% high) unless given."""
    rng = _synthetic.subject_rng(seed, number)
    drawn = bool(rng.uniform() < 0.7)
    return render_subject(rng, draw_subject(rng, drawn if high_grade is None else high_grade),
                          domain)


def _grade_of(number: int) -> str:
    """HGG for about 70% of the source's labeled cases (fixed by the subject number)."""
    return "LGG" if number % 3 == 0 else "HGG"


def generate_source(folder: str, num_training: int = NUM_TRAINING,
                    num_testing: int = NUM_TESTING) -> None:
    """Writes the source domain (BraTS 2018 layout) into `folder`."""
    for number in range(1, num_training + num_testing + 1):
        labeled = number <= num_training
        case = f"Brats18_SYN_{number:03d}_1" if labeled else f"Brats18_SYNV_{number:03d}_1"
        parent = _grade_of(number) if labeled else "Validation"
        case_dir = os.path.join(folder, parent, case)
        os.makedirs(case_dir, exist_ok=True)
        images, label = _subject(_SEED, number, SOURCE,
                                 high_grade=_grade_of(number) == "HGG" if labeled else None)
        for modality, image in zip(brats.MODALITIES, images):
            _synthetic.write_nifti(image, SOURCE.spacing_xyz,
                                   os.path.join(case_dir, f"{case}_{modality}.nii.gz"))
        if labeled:
            _synthetic.write_nifti(label, SOURCE.spacing_xyz,
                                   os.path.join(case_dir, f"{case}_seg.nii.gz"))


def generate_target(folder: str, num_labeled: int = NUM_TARGET_LABELED,
                    num_unlabeled: int = NUM_TARGET_UNLABELED,
                    num_test: int = NUM_TARGET_TEST) -> None:
    """Writes the target domain (nnU-Net folder layout) into `folder`."""
    groups = (("imagesTr", "labelsTr", num_labeled), ("imagesUnl", None, num_unlabeled),
              ("imagesTs", "labelsTs", num_test))
    description = {
        "name": "synthetic_tumor target domain",
        "channel_names": {str(i): m for i, m in enumerate(brats.MODALITIES)},
        "labels": {name: value for name, value in zip(brats.CLASS_NAMES, brats.LABEL_VALUES)},
        "numTraining": num_labeled, "file_ending": ".nii.gz"}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as stream:
        json.dump(description, stream, indent=1)
    number = 0
    for images_folder, labels_folder, count in groups:
        os.makedirs(os.path.join(folder, images_folder), exist_ok=True)
        if labels_folder:
            os.makedirs(os.path.join(folder, labels_folder), exist_ok=True)
        for _ in range(count):
            number += 1
            case = f"tumour_{number:03d}"
            images, label = _subject(_TARGET_SEED, number, TARGET)
            for channel, image in enumerate(images):
                _synthetic.write_nifti(image, TARGET.spacing_xyz, os.path.join(
                    folder, images_folder, f"{case}_{channel:04d}.nii.gz"))
            if labels_folder:
                _synthetic.write_nifti(label, TARGET.spacing_xyz,
                                       os.path.join(folder, labels_folder, f"{case}.nii.gz"))


def generate(folder: str, num_training: int = NUM_TRAINING, num_testing: int = NUM_TESTING,
             target_counts: Sequence[int] = (NUM_TARGET_LABELED, NUM_TARGET_UNLABELED,
                                             NUM_TARGET_TEST)) -> None:
    """Writes both domains into `folder`/source and `folder`/target (non-atomically;
    `prepare` wraps it atomically)."""
    generate_source(os.path.join(folder, "source"), num_training, num_testing)
    generate_target(os.path.join(folder, "target"), *target_counts)


# Both domains are processed on one grid, so a model of one runs on the other.
_SPACING_XY = (2.0, 2.0)
_CROP_YX = (80, 80)


class _Generated:
    """`prepare` of both domains: one generation holds them, each reads its own subfolder."""

    cache_name = "synthetic_tumor"
    domain: str
    num_training: int
    num_testing: int
    target_counts: tuple[int, int, int]

    def prepare(self, data_dir: str | None) -> str:
        counts = {"training": self.num_training, "testing": self.num_testing,
                  "target": list(self.target_counts)}
        if data_dir:  # a domain folder returned earlier: prepare its generation
            path = os.path.abspath(os.path.expanduser(data_dir))
            if (os.path.basename(path) in DOMAINS and os.path.isfile(
                    os.path.join(os.path.dirname(path), _synthetic.MARKER_NAME))):
                data_dir = os.path.dirname(path)
        root = _synthetic.prepare_folder(
            data_dir, generator=f"tfseg.datasets.{self.cache_name}", version=GENERATOR_VERSION,
            counts=counts, cache_name=self.cache_name,
            write_files=lambda folder: generate(folder, self.num_training, self.num_testing,
                                                self.target_counts))
        return os.path.join(root, self.domain)


@dataclasses.dataclass(frozen=True)
class SyntheticTumorSource(_Generated, brats.BratsDataset):
    """The source domain, in the BraTS 2018 layout, read by the BraTS reader."""

    name: str = "synthetic_tumor"
    n4_default: bool = False  # see the module docstring
    target_spacing_xy: tuple[float, float] | None = _SPACING_XY
    crop_size_yx: tuple[int, int] | None = _CROP_YX
    content_version: int | None = GENERATOR_VERSION
    domain: str = "source"
    num_training: int = NUM_TRAINING
    num_testing: int = NUM_TESTING
    target_counts: tuple[int, int, int] = (NUM_TARGET_LABELED, NUM_TARGET_UNLABELED,
                                           NUM_TARGET_TEST)

    def options(self) -> dict[str, Any]:
        return dict(super().options(), domain=self.domain)


@dataclasses.dataclass(frozen=True)
class SyntheticTumorTarget(_Generated, folder_lib.FolderDataset):
    """The target domain, in the nnU-Net folder layout, with BraTS classes and regions."""

    name: str = "synthetic_tumor"
    n4_default: bool = False
    modalities: tuple[str, ...] = brats.MODALITIES
    class_names: tuple[str, ...] = brats.CLASS_NAMES
    label_values: tuple[int, ...] = brats.LABEL_VALUES
    regions: tuple[tuple[str, tuple[int, ...]], ...] = brats.REGIONS
    target_spacing_xy: tuple[float, float] | None = _SPACING_XY
    crop_size_yx: tuple[int, int] | None = _CROP_YX
    n4_shrink: int = 4
    content_version: int | None = GENERATOR_VERSION
    domain: str = "target"
    target: str = "regions"
    num_training: int = NUM_TRAINING
    num_testing: int = NUM_TESTING
    target_counts: tuple[int, int, int] = (NUM_TARGET_LABELED, NUM_TARGET_UNLABELED,
                                           NUM_TARGET_TEST)

    def options(self) -> dict[str, Any]:
        return {"domain": self.domain, "target": self.target,
                "modalities": ",".join(self.modalities)}

    def resolve(self, data_dir: str) -> "SyntheticTumorTarget":
        return self  # the facts are fixed (and the modalities may be a chosen subset)

    def list_subjects(self, data_dir: str, **options: Any) -> list:
        subjects = folder_lib.FolderDataset.list_subjects(self, data_dir)
        order = [brats.MODALITIES.index(m) for m in self.modalities]
        return [dataclasses.replace(s, image_paths=tuple(s.image_paths[i] for i in order))
                for s in subjects]


def make_dataset(domain: str = "source", target: str | None = None,
                 modalities: str | tuple[str, ...] | None = None,
                 num_training: int = NUM_TRAINING, num_testing: int = NUM_TESTING,
                 target_counts: Sequence[int] = (NUM_TARGET_LABELED, NUM_TARGET_UNLABELED,
                                                 NUM_TARGET_TEST),
                 **brats_options: Any):
    """One domain of synthetic_tumor with the BraTS options (`target`, `modalities`, and any
    further BraTS option such as `protocol`; the target domain takes target and modalities).
    `target` / `modalities` None: the protocol's (BraTS default: regions, all four).

    Raises:
      ValueError: for an unknown domain or a BraTS option error.
    """
    if domain not in DOMAINS:
        raise ValueError(f"Unknown synthetic_tumor domain {domain!r}; choose source or target.")
    if isinstance(target_counts, str):  # "--dataset_option=target_counts=4,12,8"
        target_counts = [c for c in target_counts.split(",") if c.strip()]
    counts = dict(num_training=int(num_training), num_testing=int(num_testing),
                  target_counts=tuple(int(c) for c in target_counts))
    if len(counts["target_counts"]) != 3 or min(counts["target_counts"]) < 0:
        raise ValueError(f"synthetic_tumor target_counts must be 3 counts (labeled, unlabeled, "
                         f"test), got {target_counts!r}.")
    facts = brats.make_dataset(target=target, modalities=modalities, **brats_options)
    if domain == "source":
        # The synthetic grid (2 mm, 80 x 80) unless a protocol sets the geometry.
        own_geometry = brats_options.get("protocol", "default") == "default"
        fields = {f.name: getattr(facts, f.name) for f in dataclasses.fields(facts)
                  if f.name not in ("name", "content_version", "n4_default") and not (own_geometry and f.name in (
                      "target_spacing_xy", "crop_size_yx"))}
        return SyntheticTumorSource(**fields, **counts)
    if brats_options:
        raise ValueError(f"The synthetic_tumor target domain takes only target and modalities, "
                         f"got {sorted(brats_options)}.")
    return SyntheticTumorTarget(modalities=facts.modalities, class_names=facts.class_names,
                                label_values=facts.label_values, label_map=facts.label_map,
                                regions=facts.regions, region_paint=facts.region_paint,
                                target=facts.target, **counts)
