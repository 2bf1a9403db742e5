"""synthetic_cardiac: embedded short-axis cine-MR phantoms in the ACDC layout (no download).

What is generated (deterministically, `GENERATOR_VERSION`), under the folder `prepare` returns:

    training/patient001..026/{Info.cfg, patientNNN_frame01.nii.gz, patientNNN_frameYY.nii.gz,
                              and the two _gt.nii.gz}          labeled (ED = frame01, ES = YY)
    testing/patient027..036/{Info.cfg, the two frames}          unlabeled: no ground truth

so the ACDC reader (`AcdcDataset.list_subjects`, `phase="ES"|"ED"|"both"`) is what reads it.
Labels: 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity (papillary muscles included in
the cavity, RV free wall and atria are background, as in ACDC's annotation protocol).

Each patient belongs to one ACDC group (NOR, MINF, DCM, HCM, RV, in turn), which sets its
anatomy: cavity size, wall thickness (HCM: thick, asymmetric septum; MINF: a thinned infarct
sector), RV size and the ED→ES contraction (ejection fraction ~60% NOR, ~35% MINF, ~25% DCM).
Per patient: in-plane spacing U(1.5, 1.8) mm, slice thickness 8–10 mm, 8–10 slices, 128–160
pixels per side, heart position, orientation and long-axis tilt; per slice a small
breath-hold shift. The slice stack runs from the atria (above the base: bright atrial blood
labeled background) through the apex (myocardial cap without cavity). Around the heart:
epicardial fat, lungs with bright vessels, chest-wall muscle and subcutaneous fat, descending
aorta, spine and, in apical slices, the liver. Image formation: partial volume (exact in-plane
edge coverage, 4 sub-slices averaged through each slice), blur (σ 0.6 px), tissue texture, a
smooth multiplicative bias field, per-slice gain, Rician noise (blood SNR ~15–30), int16.

Default geometry: in-plane resampling to 1.8 mm and a 96×96 centre crop (172.8 mm). The native
spacing is 1.5–1.8 mm, so 1.8 mm loses little and keeps the ED wall 3–8 pixels thick, and a 96²
slice trains a 2D U-Net about 1.8× faster than 128². The whole labeled heart of every default
patient (both phases) lies within 70 mm of the image centre (the crop reaches ±86.4 mm), which
tests/test_synthetic.py checks (every default patient in its slow test).

Not trivial (measured on the first 20 training patients, both phases, each volume scaled by its 2nd /
98th intensity percentiles as preprocessing does): the best intensity-only classifier — each of
128 intensity bins, over the whole training set, assigned its majority class: an oracle
threshold set fitted on the evaluation data itself — scores Dice RV 0.00, Myo 0.00, LV 0.00:
blood in the RV, LV, atria and aorta is one intensity, and so is myocardium, chest-wall muscle
and mediastinum. Restricted to the true heart bounding box (+10 mm) it reaches RV 0.00, Myo
0.00, LV 0.49 (mean 0.16), and the blood pool (RV ∪ LV) as one class only 0.68. Location, shape
and context must be learned. Learnable: a small 2D U-Net (filters 8–64, Dice+CE, 600 steps of
8 slices, flips/rotations) on the default preprocessing reaches test Dice RV/Myo/LV 0.43 / 0.55
/ 0.67 from one labeled patient (tr1_c1) and 0.74 / 0.83 / 0.89 from twelve ("all").
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from tfseg.datasets import _layout, _synthetic
from tfseg.datasets.acdc import AcdcDataset

# Version 2: 26 training patients (was 20), so that the published splits validate on 8 patients
# (every group at least once) instead of 2: with 2, the selected checkpoint's validation Dice
# said little about its test Dice (best validation 0.81, test 0.55 in one run). Patient N is the
# same image in both versions.
GENERATOR_VERSION = 2
NUM_TRAINING = 26
NUM_TESTING = 10
_SEED = 20_170_930

# ---------------------------------------------------------------------------------------------
# Phantom: parameters per patient, then one frame (ED or ES) at a time
# ---------------------------------------------------------------------------------------------

GROUPS = ("NOR", "MINF", "DCM", "HCM", "RV")
_SUBSLICES = np.array([-3, -1, 1, 3], np.float32) / 8.0  # through-plane samples per slice
# Group -> (ED cavity radius mm, wall mm, ES/ED cavity radius ratio, RV scale, RV ES ratio).
_GROUP_RANGES = {
    "NOR": ((22, 26), (7, 9), (0.62, 0.70), (0.95, 1.10), (0.70, 0.78)),
    "MINF": ((25, 30), (6.5, 8.5), (0.78, 0.86), (0.95, 1.10), (0.75, 0.85)),
    "DCM": ((29, 33), (6, 7.5), (0.86, 0.92), (1.00, 1.15), (0.80, 0.90)),
    "HCM": ((19, 23), (11, 15), (0.50, 0.60), (0.90, 1.05), (0.70, 0.78)),
    "RV": ((21, 25), (7, 9), (0.65, 0.72), (1.30, 1.50), (0.82, 0.90)),
}
# bSSFP intensities relative to blood.
_TISSUES = {"blood": 1.0, "myocardium": 0.27, "muscle": 0.30, "fat": 0.85, "liver": 0.42,
            "lung": 0.06, "soft": 0.45, "bone": 0.55, "vessel": 0.70}


def draw_patient(rng: np.random.Generator, group: str) -> dict[str, Any]:
    """Draws one patient's acquisition geometry, anatomy and contrast (all in mm)."""
    u = rng.uniform
    p: dict[str, Any] = {"group": group}
    cavity, wall, es_ratio, rv_scale, rv_es_ratio = _GROUP_RANGES[group]
    p["spacing_xy"] = round(u(1.5, 1.8), 4)
    p["slice_thickness"] = float(rng.choice([8.0, 8.5, 9.0, 9.5, 10.0]))
    p["num_slices"] = int(rng.integers(8, 11))
    p["size_yx"] = (int(rng.integers(128, 161)), int(rng.integers(128, 161)))
    p["num_frames"] = int(rng.integers(20, 31))
    p["es_frame"] = int(round(u(0.30, 0.42) * p["num_frames"])) + 1
    p["height_cm"], p["weight_kg"] = u(150, 195), u(50, 110)
    # Heart: base plane inside the first slice or just below it, apex before the last slice.
    p["cavity_radius"], p["wall"] = u(*cavity), u(*wall)
    p["es_ratio"], p["rv_scale"], p["rv_es_ratio"] = u(*es_ratio), u(*rv_scale), u(*rv_es_ratio)
    thickness = p["slice_thickness"]
    p["z_base"] = u(-0.2, 0.9) * thickness
    apex_limit = (p["num_slices"] - 0.5 - u(0.0, 1.2)) * thickness - p["z_base"]
    p["length_outer"] = min(u(70, 90) * (1.1 if group == "DCM" else 1.0), apex_limit)
    p["apex_wall"] = u(5, 8) * (1.4 if group == "HCM" else 1.0)
    p["base_descent"] = u(6, 12) * (0.5 if group in ("DCM", "MINF") else 1.0)
    p["rv_length"] = u(0.70, 0.88)
    p["rv_offset"], p["rv_width"], p["rv_depth"] = u(0.50, 0.60), u(1.2, 1.45), u(0.80, 0.95)
    p["rv_wall"] = u(2.5, 3.5)
    p["rv_angle"] = np.pi + 0.3 + u(-0.15, 0.15)
    p["rotation"] = u(-0.45, 0.45)  # whole anatomy, radians
    p["tilt"] = (u(-0.1, 0.1), u(-0.1, 0.1))  # LV centre shift per mm along the long axis
    outer = p["cavity_radius"] + p["wall"]
    away = -0.3 * outer  # shift the LV away from the RV so the whole heart is near the centre
    angle = p["rv_angle"] + p["rotation"]
    p["centre"] = (away * np.cos(angle) + u(-8, 8), away * np.sin(angle) + u(-8, 8))
    p["cavity_harmonics"] = [(u(0, 0.06), u(0, 2 * np.pi)) for _ in (2, 3)]
    p["wall_harmonics"] = [(u(0, 0.12), u(0, 2 * np.pi)) for _ in (2, 3)]
    p["infarct"] = (u(0, 2 * np.pi), u(0.4, 0.6)) if group == "MINF" else None
    p["septal_thickening"] = u(0.3, 0.6) if group == "HCM" else 0.0
    p["papillary"] = (u(0.14, 0.2), u(0.8, 1.0))
    p["fat"] = (u(1.0, 3.0), u(0, 2 * np.pi))
    p["atria"] = {"la": (u(0.1, 0.3), u(0.1, 0.3), u(0.75, 0.95), u(30, 45)),
                  "ra": (u(1.0, 1.2), u(0.6, 0.8)), "aorta": (u(11, 14), u(0.8, 1.2))}
    # Body, in the standard pose (x right, y down = posterior; mm from the LV centre).
    p["body"] = {"centre": (u(-25, -5), u(25, 45)), "axes": (u(150, 185), u(105, 130)),
                 "angle": u(-0.15, 0.15), "fat": u(6, 18), "muscle": u(8, 14),
                 "lung_gap": (u(1, 8), u(1, 8)), "lung_axes": (u(45, 60), u(65, 85)),
                 "lung_q": (u(-10, 10), u(-10, 10)),
                 "aorta": (u(0, 15), outer + u(20, 30), u(10, 13)),
                 "spine": (u(-25, -15), u(20, 30), u(14, 18)),
                 "liver": (u(-40, -10), outer + u(20, 40), u(70, 90), u(40, 55), u(0.35, 0.7))}
    p["tissues"] = {k: v * u(0.9, 1.1) for k, v in _TISSUES.items()}
    p["rv_blood"], p["aorta_blood"] = u(0.88, 1.0), u(0.9, 1.05)
    p["scale"], p["noise"] = u(250, 900), u(0.035, 0.065)
    p["bias_seed"] = int(rng.integers(2**31))
    # Each slice is one breath-hold for all frames: its shift and irregularity are shared.
    p["jitter"] = np.clip(rng.normal(0, 1.0, (p["num_slices"], 2)), -3, 3).tolist()
    p["slice_scale"] = rng.uniform(0.97, 1.03, p["num_slices"]).tolist()
    return p


def _harmonic(phi: np.ndarray, terms: Sequence[tuple[float, float]]) -> np.ndarray:
    return 1.0 + sum(a * np.cos(k * phi + phase) for k, (a, phase) in zip((2, 3), terms))


def _profile(u: np.ndarray, length: float) -> np.ndarray:
    """Radius profile of a half-ellipsoid from the base plane (u = 0) to its tip (u = length)."""
    inside = (u >= 0) & (u < length)
    return np.where(inside, np.sqrt(np.clip(1.0 - (u / max(length, 1e-3)) ** 2, 0, 1)), 0.0)


def _body_layers(p: Mapping[str, Any], bx: np.ndarray, by: np.ndarray,
                 rng: np.random.Generator) -> list:
    """Static surroundings at slice resolution, top layer first: (mask, intensity, class 0).

    Args:
      bx, by: standard-pose coordinates (mm from the LV centre), (slices, rows, columns).
    """
    t, b, s = p["tissues"], p["body"], p["spacing_xy"]
    soft = lambda d: _synthetic.soft_inside(d, s)  # noqa: E731
    outer = p["cavity_radius"] + p["wall"]
    ca, sa = np.cos(b["angle"]), np.sin(b["angle"])
    u0, v0 = bx - b["centre"][0], by - b["centre"][1]
    body = _synthetic.ellipse_signed_distance(ca * u0 + sa * v0, -sa * u0 + ca * v0, *b["axes"])
    inner = body - b["fat"] - b["muscle"]
    rv_reach = outer * (p["rv_offset"] + p["rv_depth"] * p["rv_scale"]) + p["rv_wall"]
    lung = np.full(bx.shape, -1e3, np.float32)
    for side, gap, q in ((1, b["lung_gap"][0], b["lung_q"][0]),
                         (-1, b["lung_gap"][1], b["lung_q"][1])):
        cx = side * ((outer if side > 0 else rv_reach) + gap + b["lung_axes"][0])
        lung = np.maximum(lung, _synthetic.ellipse_signed_distance(bx - cx, by - q,
                                                                   *b["lung_axes"]))
    lung = np.minimum(lung, inner)
    # Pulmonary vessels: bright cross-sections, new ones in every slice.
    vessels = np.full(bx.shape, -1e3, np.float32)
    for k in range(bx.shape[0]):
        rows, cols = np.nonzero(lung[k] > 4.0)
        for i in rng.choice(len(rows), size=min(12, len(rows)), replace=False):
            radius, r0, c0 = rng.uniform(1.5, 3.0), rows[i], cols[i]
            h = int(radius / s) + 2
            window = (k, slice(max(r0 - h, 0), min(r0 + h + 1, bx.shape[1])),
                      slice(max(c0 - h, 0), min(c0 + h + 1, bx.shape[2])))
            rr, cc = np.ogrid[window[1], window[2]]
            vessels[window] = np.maximum(vessels[window],
                                         radius - s * np.hypot(rr - r0, cc - c0))
    ax, ay, ar = b["aorta"]
    sx, sy, sr = b["spine"]
    lx, ly, la, lb, level = b["liver"]
    # The liver lies below the diaphragm plane; slices cut by it get the covered fraction.
    z = (np.arange(bx.shape[0])[:, None] + _SUBSLICES[None]) * p["slice_thickness"]
    below = (z > p["z_base"] + level * p["length_outer"]).mean(axis=1).astype(np.float32)
    liver = soft(np.minimum(_synthetic.ellipse_signed_distance(bx - lx, by - ly, la, lb), inner))
    return [(soft(ar - np.hypot(bx - ax, by - ay)), t["blood"] * p["aorta_blood"], 0),
            (soft(sr - np.hypot(bx - ax - sx, by - ay - sy)), t["bone"], 0),
            (liver * below[:, None, None], t["liver"], 0),
            (soft(np.minimum(vessels, lung)), t["vessel"], 0),
            (soft(lung), t["lung"], 0),
            (soft(inner), t["soft"], 0),
            (soft(body - b["fat"]), t["muscle"], 0),
            (soft(body), t["fat"], 0)]


def _heart_layers(p: Mapping[str, Any], hx: np.ndarray, hy: np.ndarray, u: np.ndarray,
                  phase: str, slice_scale: np.ndarray) -> list:
    """The heart at one phase, top layer first: (mask, intensity, class)."""
    t, s, es = p["tissues"], p["spacing_xy"], phase == "ES"
    descent = p["base_descent"] if es else 0.0
    u = u - descent
    length_outer = p["length_outer"] - descent
    apex_wall = p["apex_wall"] * (1.2 if es else 1.0)
    length_cavity = length_outer - apex_wall
    radius_ed, outer_ed = p["cavity_radius"], p["cavity_radius"] + p["wall"]
    radius = radius_ed * (p["es_ratio"] if es else 1.0)
    outer = np.sqrt(radius ** 2 + (outer_ed ** 2 - radius_ed ** 2) * (1.04 if es else 1.0))
    r, phi = np.hypot(hx, hy), np.arctan2(hy, hx)
    prof_cavity, prof_outer = _profile(u, length_cavity), _profile(u, length_outer)
    r_cavity = radius * prof_cavity * _harmonic(phi, p["cavity_harmonics"]) * slice_scale
    wall = (outer * prof_outer - radius * prof_cavity) * _harmonic(phi, p["wall_harmonics"])
    if p["infarct"] is not None:
        centre, depth = p["infarct"]
        gap = np.angle(np.exp(1j * (phi - centre)))
        wall = wall * (1.0 - depth * np.exp(-(gap / 0.45) ** 2))
    wall = wall * (1.0 + p["septal_thickening"] * np.clip(np.cos(phi - p["rv_angle"]), 0, 1) ** 2)
    r_outer = r_cavity + wall * slice_scale
    cavity = np.where(prof_cavity > 0, r_cavity - r, -1e3)
    epicardium = np.where(prof_outer > 0, r_outer - r, -1e3)
    # Papillary muscles (labeled LV cavity, as in ACDC), mid-ventricular levels only.
    size, spread = p["papillary"]
    taper = np.clip(np.minimum(u / length_cavity - 0.15, 0.8 - u / length_cavity) * 8, 0, 1)
    papillary = np.full(r.shape, -1e3, np.float32)
    for sign in (1, -1):
        a = p["rv_angle"] + np.pi + sign * spread
        cr = 0.6 * radius * prof_cavity
        d = np.hypot(hx - cr * np.cos(a), hy - cr * np.sin(a))
        papillary = np.maximum(papillary, size * radius * prof_cavity * taper - d)
    # RV: an ellipse beside the LV, minus the LV; its free wall is background.
    rv_scale = p["rv_scale"] * (p["rv_es_ratio"] if es else 1.0)
    prof_rv = _profile(u, p["rv_length"] * length_cavity)
    ca, sa = np.cos(p["rv_angle"]), np.sin(p["rv_angle"])
    along = ca * hx + sa * hy - p["rv_offset"] * outer * prof_outer
    across = -sa * hx + ca * hy
    depth = np.maximum(p["rv_depth"] * rv_scale * outer_ed * prof_rv, 1e-3)
    width = np.maximum(p["rv_width"] * rv_scale * outer_ed * prof_rv, 1e-3)
    rv_ellipse = np.where(prof_rv > 0, _synthetic.ellipse_signed_distance(along, across, depth,
                                                                          width), -1e3)
    rv_cavity = np.minimum(rv_ellipse, -epicardium)
    rv_wall = np.minimum(rv_ellipse + p["rv_wall"], -epicardium)
    # Above the base: left and right atria and the aortic root (blood, labeled background).
    la_x, la_y, la_size, la_height = p["atria"]["la"]
    ra_offset, ra_size = p["atria"]["ra"]
    ao_radius, ao_angle = p["atria"]["aorta"]
    above = _profile(-u, la_height)
    atria = np.maximum(
        above * la_size * radius_ed - np.hypot(hx - la_x * outer_ed, hy - la_y * outer_ed),
        above * ra_size * radius_ed - np.hypot(hx - ra_offset * outer_ed * ca,
                                               hy - ra_offset * outer_ed * sa))
    atria = np.where(above > 0, atria, -1e3)
    ao = p["rv_angle"] - ao_angle
    root = np.where((u > -25) & (u < 5), ao_radius - np.hypot(
        hx - 0.45 * outer_ed * np.cos(ao), hy - 0.45 * outer_ed * np.sin(ao)), -1e3)
    fat_mean, fat_phase = p["fat"]
    fat_width = np.clip(fat_mean * (1 + np.cos(2 * phi + fat_phase)), 0, 6)
    fat = np.maximum.reduce([epicardium, rv_wall, atria + 2, root + 2]) + fat_width
    soft = lambda d: _synthetic.soft_inside(d, s)  # noqa: E731
    blood = t["blood"]
    return [(soft(papillary), t["myocardium"], 3),
            (soft(cavity), blood, 3),
            (soft(rv_cavity), blood * p["rv_blood"], 1),
            (soft(epicardium), t["myocardium"], 2),
            (soft(rv_wall), t["myocardium"], 0),
            (soft(np.maximum(atria, root)), blood, 0),
            (soft(np.maximum(atria, root) + 2), t["myocardium"], 0),
            (soft(np.where((u > -15) & (u < length_outer + 3), fat, -1e3)), t["fat"], 0)]


def _heart_window(p: Mapping[str, Any], shape_yx: Sequence[int]) -> tuple[slice, slice]:
    """Rows and columns that can hold any heart structure (the rest is body only)."""
    outer, cavity = p["cavity_radius"] + p["wall"], p["cavity_radius"]
    la_x, la_y, la_size, _ = p["atria"]["la"]
    ra_offset, ra_size = p["atria"]["ra"]
    reach = max(outer * (p["rv_offset"] + p["rv_depth"] * p["rv_scale"]) + p["rv_wall"],
                outer * (1.0 + max(p["wall_harmonics"][0][0], 0.1) + 0.2),
                outer * np.hypot(la_x, la_y) + la_size * cavity + 2,
                outer * ra_offset + ra_size * cavity + 2,
                outer * 0.45 + p["atria"]["aorta"][0] + 2) + 6.0 + 3 * p["spacing_xy"]
    reach += max(abs(t) for t in p["tilt"]) * (p["num_slices"] + 1) * p["slice_thickness"]
    reach += 3.0  # breath-hold jitter
    s, (ny, nx) = p["spacing_xy"], shape_yx
    cy, cx = (ny - 1) / 2 + p["centre"][1] / s, (nx - 1) / 2 + p["centre"][0] / s
    half = reach / s
    return (slice(max(int(cy - half), 0), min(int(cy + half) + 2, ny)),
            slice(max(int(cx - half), 0), min(int(cx + half) + 2, nx)))


def render_patient(rng: np.random.Generator, p: Mapping[str, Any]
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Renders the ED and ES frames: phase -> (image int16, label uint8), each (Z, Y, X)."""
    s, thickness = p["spacing_xy"], p["slice_thickness"]
    ny, nx, nz, nsub = *p["size_yx"], p["num_slices"], len(_SUBSLICES)
    y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * s)[None, :, None]
    x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * s)[None, None, :]
    jitter = np.asarray(p["jitter"], np.float32)[:, :, None, None]  # (nz, 2, 1, 1)
    cr, sr = np.float32(np.cos(p["rotation"])), np.float32(np.sin(p["rotation"]))

    def pose(x, y, jitter):  # image mm -> standard-pose mm from the LV centre
        ix, iy = x - p["centre"][0] - jitter[:, 0], y - p["centre"][1] - jitter[:, 1]
        return cr * ix + sr * iy, -sr * ix + cr * iy

    body, _ = _synthetic.composite(_body_layers(p, *pose(x, y, jitter), rng), num_classes=1)
    rows, cols = _heart_window(p, (ny, nx))
    # The heart at sub-slice resolution (through-plane partial volume), in its window only.
    bx, by = pose(x[:, :, cols], y[:, rows], np.repeat(jitter, nsub, axis=0))
    lift = (np.arange(nz, dtype=np.float32)[:, None] + _SUBSLICES[None]).reshape(-1, 1, 1)
    lift = lift * thickness - p["z_base"]
    hx = bx - (cr * p["tilt"][0] + sr * p["tilt"][1]) * lift
    hy = by - (-sr * p["tilt"][0] + cr * p["tilt"][1]) * lift
    slice_scale = np.repeat(np.asarray(p["slice_scale"], np.float32), nsub).reshape(-1, 1, 1)
    zc = ((np.arange(nz, dtype=np.float32) - (nz - 1) / 2) * thickness)[:, None, None]
    bias = _synthetic.bias_field(np.random.default_rng(p["bias_seed"]), (x, y, 0.5 * zc),
                                 extent_mm=120.0, log_std=0.15)
    frames = {}
    for phase in ("ED", "ES"):
        layers = _heart_layers(p, hx, hy, lift, phase, slice_scale)
        layers.append((np.float32(1.0), np.repeat(body[:, rows, cols], nsub, axis=0), 0))
        window, fractions = _synthetic.composite(layers, num_classes=4)
        image = body.copy()
        image[:, rows, cols] = window.reshape(nz, nsub, *window.shape[1:]).mean(axis=1)
        label = np.zeros((nz, ny, nx), np.uint8)
        label[:, rows, cols] = _synthetic.majority_label(
            fractions.reshape(4, nz, nsub, *window.shape[1:]).mean(axis=2))
        texture = _synthetic.smooth_noise(rng, image.shape, (0, 1.2, 1.2))
        image = ndimage.gaussian_filter(image * (1 + 0.05 * texture), (0, 0.6, 0.6))
        gain = rng.uniform(0.95, 1.05, (nz, 1, 1)).astype(np.float32)
        image = _synthetic.rician_noise(rng, image * bias * gain * p["scale"],
                                        p["noise"] * p["scale"])
        frames[phase] = (_synthetic.to_int16(image), label)
    return frames


# ---------------------------------------------------------------------------------------------
# Layout and published splits
# ---------------------------------------------------------------------------------------------

def _patients(*numbers: int) -> list[str]:
    return _layout.numbered("patient", numbers, width=3)


# Published splits (patient ids) of the default 26 + 10 patients: validation 019–026 and test
# 013–018 (every group at least once in each), labeled pool 001–012 (groups NOR, MINF, DCM, HCM,
# RV in turn, so tr1_c1..c5 are one patient of each group).
_VAL = _patients(*range(19, 27))
_TEST = _patients(*range(13, 19))
_POOL = list(range(1, 13))
_TESTING = _patients(*range(NUM_TRAINING + 1, NUM_TRAINING + NUM_TESTING + 1))
_LABELED = {
    "tr1_c1": (1,), "tr1_c2": (2,), "tr1_c3": (3,), "tr1_c4": (4,), "tr1_c5": (5,),
    "tr3_c1": (1, 2, 3), "tr3_c2": (4, 5, 6), "tr3_c3": (7, 8, 9), "tr3_c4": (10, 11, 12),
    "tr3_c5": (1, 6, 11),
}


def _split(labeled: Sequence[int]) -> dict[str, list[str]]:
    # As in ACDC's published splits, pool patients not used as labeled serve as unlabeled.
    unused = [n for n in _POOL if n not in labeled]
    return {"labeled": _patients(*labeled), "unlabeled": _patients(*unused) + _TESTING,
            "val": list(_VAL), "test": list(_TEST)}


PUBLISHED_SPLITS: dict[str, dict[str, list[str]]] = {
    "all": {"labeled": _patients(*_POOL), "unlabeled": list(_TESTING), "val": list(_VAL),
            "test": list(_TEST)},
    **{name: _split(numbers) for name, numbers in _LABELED.items()},
}


def _info_cfg(params: Mapping[str, Any]) -> str:
    return (f"ED: 1\nES: {params['es_frame']}\nGroup: {params['group']}\n"
            f"Height: {params['height_cm']:.1f}\nNbFrame: {params['num_frames']}\n"
            f"Weight: {params['weight_kg']:.1f}\n")


def write_patient(folder: str, number: int, labeled: bool) -> None:
    """Writes one patient folder `folder/patientNNN` (frames, Info.cfg, gt when `labeled`).

    Args:
      folder: the training/ or testing/ folder.
      number: the patient number (also selects its random stream).
      labeled: whether to write the _gt files.
    """
    patient = f"patient{number:03d}"
    rng = _synthetic.subject_rng(_SEED, number)
    params = draw_patient(rng, GROUPS[(number - 1) % len(GROUPS)])
    patient_dir = os.path.join(folder, patient)
    os.makedirs(patient_dir)
    spacing_xyz = (params["spacing_xy"], params["spacing_xy"], params["slice_thickness"])
    frames = render_patient(rng, params)
    for frame, phase in ((1, "ED"), (params["es_frame"], "ES")):
        image, label = frames[phase]  # (Z, Y, X) int16 / uint8
        stem = os.path.join(patient_dir, f"{patient}_frame{frame:02d}")
        _synthetic.write_nifti(image, spacing_xyz, stem + ".nii.gz")
        if labeled:
            _synthetic.write_nifti(label, spacing_xyz, stem + "_gt.nii.gz")
    with open(os.path.join(patient_dir, "Info.cfg"), "w", encoding="utf-8") as f:
        f.write(_info_cfg(params))


def generate(folder: str, num_training: int = NUM_TRAINING, num_testing: int = NUM_TESTING
             ) -> None:
    """Writes the dataset into `folder` (which must be empty or absent), non-atomically.

    `SyntheticCardiacDataset.prepare` calls this on a temporary folder; call it directly only to
    inspect the generator. Patients 1..num_training go to training/, the next num_testing to
    testing/ without ground truth.
    """
    for part in ("training", "testing"):
        os.makedirs(os.path.join(folder, part), exist_ok=True)
    for number in range(1, num_training + 1):
        write_patient(os.path.join(folder, "training"), number, labeled=True)
    for number in range(num_training + 1, num_training + num_testing + 1):
        write_patient(os.path.join(folder, "testing"), number, labeled=False)


@dataclasses.dataclass(frozen=True)
class SyntheticCardiacDataset(_synthetic.GeneratedDataset, AcdcDataset):
    """ACDC-layout synthetic cine MR, read by the ACDC reader.

    `num_training` / `num_testing` shrink it (tests); patient N is the same whatever the counts.
    """

    name: str = "synthetic_cardiac"
    target_spacing_xy: tuple[float, float] | None = (1.8, 1.8)
    crop_size_yx: tuple[int, int] | None = (96, 96)
    # The images are small (about 128×154 in-plane): a 4× shrunk N4 fit has too few voxels
    # (bias-field correlation with the full-resolution fit 0.87), 2× keeps 0.98 at ~2 s/subject.
    n4_shrink: int = 2
    published_splits: Mapping[str, Mapping[str, Sequence[str]]] = dataclasses.field(
        default_factory=lambda: PUBLISHED_SPLITS)
    default_split: str | None = "tr1_c1"
    content_version: int | None = GENERATOR_VERSION
    num_training: int = NUM_TRAINING
    num_testing: int = NUM_TESTING

    cache_name = "synthetic_cardiac"
    generate_files = staticmethod(generate)


def make_dataset(phase: str = "ES") -> SyntheticCardiacDataset:
    """The synthetic cardiac dataset reading the `phase` frames ("ES", "ED" or "both").

    Raises:
      ValueError: for an unknown phase.
    """
    return SyntheticCardiacDataset(phase=phase)
