"""Tests for tfseg.visualize: the colours at known pixels of the written PNG, the physical aspect
of anisotropic slices, one intensity window per subject, slice choice and file names."""
import os

import matplotlib.image as mpimg
import numpy as np
import pytest

from tfseg import visualize
from tfseg.visualize import (choose_slices, colour, compose_montage, find_overlay,
                             intensity_window, overlay_name, title_band_height, write_montage,
                             write_subject_overlay)

WHITE = np.array(visualize.BACKGROUND)


def _read_png(path):
    """(H, W, 3) uint8 as written."""
    pixels = mpimg.imread(path)[..., :3]
    return (pixels * 255 + 0.5).astype(np.uint8)


def _phantom():
    """3 slices of 30 x 30 voxels: a 10 x 10 square of class 1 (rows/cols 3..12) and a disc of
    class 2 (radius 5 around (21, 21)); image 100 in the square, 200 in the disc, else 20."""
    yy, xx = np.mgrid[:30, :30]
    square = (yy >= 3) & (yy <= 12) & (xx >= 3) & (xx <= 12)
    disc = (yy - 21) ** 2 + (xx - 21) ** 2 <= 25
    label = np.zeros((3, 30, 30), np.int32)
    label[:, square] = 1
    label[:, disc] = 2
    image = np.where(label == 1, 100.0, np.where(label == 2, 200.0, 20.0)).astype(np.float32)
    return image, label, disc


def _masks(label):
    return np.stack([label == 1, label == 2], axis=-1)


def _is_grey(pixel):
    return int(pixel[0]) == int(pixel[1]) == int(pixel[2])


def test_contours_have_the_class_colours_at_the_object_boundaries(tmp_path):
    image, label, disc = _phantom()
    truth = _masks(label)
    prediction = truth.copy()
    prediction[2, ..., 1] = False  # slice 2: the disc is missed
    path = write_subject_overlay(str(tmp_path), "case 7", image, (2.0, 1.0, 1.0),
                                 ["square", "disc"], prediction, truth, [0.9, 0.6],
                                 panel_size=300, window=(0.0, 255.0))
    assert os.path.basename(path) == "dice0.750_case_7.png"
    montage = compose_montage(image, (2.0, 1.0, 1.0), prediction, truth, panel_size=300,
                              window=(0.0, 255.0))
    assert montage.slice_indices == (0, 1, 2)
    png = _read_png(path)
    top = title_band_height(visualize.subject_title("case 7", ["square", "disc"], [0.9, 0.6],
                                                    ""), montage.pixels.shape[1])
    # 30 voxels at 1 mm -> 300 pixels: voxel (r, c) covers pixels [10r, 10r + 10).
    square_colour, disc_colour = np.array(colour(0)), np.array(colour(1))
    first_disc_col = int(np.argmax(disc[21]))  # leftmost disc voxel on its middle row
    for panel, (r0, c0, height, width) in enumerate(montage.panel_boxes):
        assert (height, width) == (300, 300)
        at = lambda r, c: png[top + r0 + r, c0 + c]  # noqa: E731
        # The square's prediction contour: solid, just inside its top and left edges.
        assert (at(30, 80) == square_colour).all() and (at(31, 80) == square_colour).all()
        assert (at(80, 30) == square_colour).all()
        # Inside the square: the image, grey (window 0..255: the value 100 itself).
        assert _is_grey(at(80, 80)) and abs(int(at(80, 80)[0]) - 100) <= 1
        # Far from both objects: grey background 20.
        assert _is_grey(at(280, 40)) and abs(int(at(280, 40)[0]) - 20) <= 1
        # The truth's contour: dotted, just outside the top edge, in the square's colour only.
        band = png[top + r0 + 28:top + r0 + 30, c0 + 40:c0 + 120].reshape(-1, 3)
        coloured = (band == square_colour).all(axis=1)
        assert 0.3 < coloured.mean() < 0.7
        assert not (band == disc_colour).all(axis=1).any()
        # The disc: truth dotted outside it in every slice; prediction solid inside it except
        # where it was missed (slice 2: the image shows through).
        inner = at(210, first_disc_col * 10)
        if panel < 2:
            assert (inner == disc_colour).all()
        else:
            assert _is_grey(inner) and abs(int(inner[0]) - 200) <= 1
        outer = png[top + r0 + 205:top + r0 + 215,
                    c0 + first_disc_col * 10 - 2:c0 + first_disc_col * 10].reshape(-1, 3)
        assert (outer == disc_colour).all(axis=1).any()


def test_panels_are_placed_unscaled_in_the_png(tmp_path):
    image, label, _ = _phantom()
    montage = compose_montage(image, (1.0, 1.0, 1.0), _masks(label), _masks(label),
                              panel_size=120)
    path = str(tmp_path / "m.png")
    title = visualize.subject_title("s", ["a", "b"], [1.0, 1.0])
    height, width = write_montage(path, montage, ["a", "b"], title)
    png = _read_png(path)
    assert png.shape == (height, width, 3) and width == montage.pixels.shape[1]
    top = title_band_height(title, width)
    np.testing.assert_array_equal(png[top:top + montage.pixels.shape[0]], montage.pixels)
    assert os.path.getsize(path) > 2000
    assert not (png[:top] == WHITE).all()  # the title was drawn
    assert not (png[top + montage.pixels.shape[0]:] == WHITE).all()  # and the legend


@pytest.mark.parametrize("spacing_zyx, slice_axis, shape, expected_ratio", [
    ((5.0, 3.0, 1.0), 0, (2, 10, 30), 1.0),        # 30 mm x 30 mm: square, not 1:3
    ((5.0, 1.0, 1.0), 0, (2, 10, 30), 1 / 3),
    ((1.0, 1.0, 4.0), 2, (40, 20, 3), 2.0),       # slices along x: rows z (40 mm), cols y
])
def test_anisotropic_spacing_gives_the_physical_aspect(tmp_path, spacing_zyx, slice_axis, shape,
                                                       expected_ratio):
    image = np.full(shape, 50.0, np.float32)
    path = write_subject_overlay(str(tmp_path), "aniso", image, spacing_zyx, ["a"],
                                 np.zeros(shape + (1,), bool), slice_axis=slice_axis,
                                 panel_size=240, window=(0.0, 100.0))
    png = _read_png(path)
    montage = compose_montage(image, spacing_zyx, np.zeros(shape + (1,), bool),
                              slice_axis=slice_axis, panel_size=240, window=(0.0, 100.0))
    assert len(montage.panel_boxes) == shape[slice_axis]
    _, _, height, width = montage.panel_boxes[0]
    assert height / width == pytest.approx(expected_ratio, rel=0.02)
    assert max(height, width) == 240
    # In the PNG: the first panel is the grey block (value 50 of 0..100) of that shape.
    top = title_band_height(visualize.subject_title("aniso", ["a"], None), png.shape[1])
    grey = (np.abs(png.astype(int) - 128) <= 1).all(axis=-1)
    grey[:top] = False  # anti-aliased title text
    rows = np.flatnonzero(grey.any(axis=1))
    first = np.flatnonzero(grey[rows[0]])
    run_end = first[0] + np.argmax(np.diff(np.append(first, -1)) != 1)
    assert run_end - first[0] + 1 == width
    assert grey[rows[0]:rows[0] + height, first[0]].all()
    assert not grey[rows[0] + height, first[0]]


def test_one_intensity_window_per_subject():
    """A dim slice stays dim next to a bright one (no per-slice normalisation)."""
    volume = np.stack([np.full((8, 8), 10.0), np.full((8, 8), 50.0), np.full((8, 8), 90.0)])
    low, high = intensity_window(volume)
    assert (low, high) == pytest.approx((10.0, 90.0))
    montage = compose_montage(volume.astype(np.float32), (1, 1, 1), None, panel_size=32)
    means = [montage.pixels[r:r + h, c:c + w].mean() for r, c, h, w in montage.panel_boxes]
    assert means[0] < 5 and means[1] == pytest.approx(127.5, abs=1.5) and means[2] > 250
    assert intensity_window(np.zeros((2, 3, 3))) == (0.0, 1.0)  # flat volume: no division by 0


def test_slices_spread_over_the_foreground_extent():
    mask = np.zeros((100, 4, 4), bool)
    mask[10:51, 1, 1] = True
    assert choose_slices([mask], 100, 5) == [10, 20, 30, 40, 50]
    assert choose_slices([np.zeros((100, 4, 4), bool)], 100, 3) == [0, 50, 99]  # all empty
    assert choose_slices([mask[:3]], 3, 8) == [0, 1, 2]                        # fewer slices
    truth = np.zeros((100, 4), bool)
    truth[80] = True
    assert choose_slices([mask, truth], 100, 2) == [10, 80]  # union of prediction and truth


def test_file_names_sort_worst_first_and_replace_the_old_overlay(tmp_path):
    names = [overlay_name("b", 0.9), overlay_name("a", 0.35), overlay_name("c", 1.0)]
    assert sorted(names) == ["dice0.350_a.png", "dice0.900_b.png", "dice1.000_c.png"]
    assert overlay_name("x/y z", None) == "x_y_z.png"
    image, label, _ = _phantom()
    first = write_subject_overlay(str(tmp_path), "s1", image, (1, 1, 1), ["a", "b"],
                                  _masks(label), _masks(label), [0.2, 0.4], panel_size=60)
    second = write_subject_overlay(str(tmp_path), "s1", image, (1, 1, 1), ["a", "b"],
                                   _masks(label), _masks(label), [0.8, 0.8], panel_size=60)
    assert os.listdir(tmp_path) == [os.path.basename(second)] and first != second
    assert find_overlay(str(tmp_path), "s1") == second
    assert find_overlay(str(tmp_path), "s2") is None


def test_2d_image_and_bad_shapes():
    montage = compose_montage(np.ones((12, 6), np.float32), (2.0, 1.0), None, panel_size=48)
    assert montage.slice_indices == (0,) and montage.panel_boxes[0][2:] == (48, 12)
    with pytest.raises(ValueError, match="expected a \\(z, y, x\\) image"):
        compose_montage(np.ones((2, 2, 2, 2)), (1, 1, 1), None)


def test_the_same_scan_stored_flipped_or_permuted_gives_the_same_montage():
    """Shown in the canonical order of preprocessing: a scan stored RAS-flipped or with x and y
    swapped gives the identical picture (anterior up, the patient's left on the right)."""
    from preprocessing.transforms import canonical_transform
    from tfseg.io import ImageMeta
    from tfseg.visualize import canonical_view

    rng = np.random.default_rng(0)
    image = rng.uniform(0, 100, (4, 12, 9)).astype(np.float32)       # (z, y, x), LPS
    masks = np.zeros((4, 12, 9, 1), bool)
    masks[1:3, 2:5, 1:4] = True                                      # off-centre: flips show
    lps = ImageMeta((1.0, 1.5, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (9, 12, 4))
    ras = ImageMeta((1.0, 1.5, 3.0), (8.0, 16.5, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), (9, 12, 4))
    swapped = ImageMeta((1.5, 1.0, 3.0), (0.0, 0.0, 0.0), (0, 1, 0, 1, 0, 0, 0, 0, 1),
                        (12, 9, 4))
    stored = {"lps": (image, masks, lps), "ras": (image[:, ::-1, ::-1], masks[:, ::-1, ::-1], ras),
              "swapped": (np.swapaxes(image, 1, 2), np.swapaxes(masks, 1, 2), swapped)}
    pictures = {}
    for name, (array, mask, meta) in stored.items():
        transform = canonical_transform(meta, 3)
        (shown, shown_mask), spacing, axis = canonical_view([array, mask], meta, transform)
        montage = compose_montage(shown, spacing, shown_mask, slice_axis=axis, panel_size=60,
                                  window=(0.0, 100.0))
        pictures[name] = montage.pixels
    np.testing.assert_array_equal(pictures["ras"], pictures["lps"])
    np.testing.assert_array_equal(pictures["swapped"], pictures["lps"])
    # Without the transform the RAS copy is drawn as stored: another picture.
    raw = compose_montage(image[:, ::-1, ::-1], (3.0, 1.5, 1.0), masks[:, ::-1, ::-1],
                          panel_size=60, window=(0.0, 100.0)).pixels
    assert not np.array_equal(raw, pictures["lps"])


def test_evaluation_callback_writes_the_flair_montage_and_survives_a_missing_image(tmp_path):
    from types import SimpleNamespace

    from tfseg.io import ImageMeta, write_image
    from tfseg.visualize import display_channel, evaluation_overlays

    assert display_channel(["t1", "t1ce", "t2", "FLAIR"]) == 3
    assert display_channel(["cine"]) == 0
    image, label, _ = _phantom()
    meta = ImageMeta((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (30, 30, 3))
    paths = [str(tmp_path / f"{m}.nii.gz") for m in ("t1", "flair")]
    write_image(np.zeros_like(image), meta, paths[0])
    write_image(image, meta, paths[1])
    manifest = {"modalities": ["t1", "flair"],
                "subjects": {"ok": {"image_paths": paths, "geometry": {}},
                             "gone": {"image_paths": [str(tmp_path / "x.nii.gz")] * 2}}}
    folder = str(tmp_path / "overlays")
    os.makedirs(folder)
    open(os.path.join(folder, "dice0.100_stale.png"), "w").close()  # an earlier evaluation
    write = evaluation_overlays(folder, manifest, ["square", "disc"], panel_size=300,
                                window=(0.0, 255.0))
    assert os.listdir(folder) == []
    record = {"square": {"dice": 1.0}, "disc": {"dice": 0.5}}
    write(SimpleNamespace(subject_id="ok"), _masks(label), _masks(label), record)
    assert os.listdir(folder) == ["dice0.750_ok.png"] and record["overlay_seconds"] >= 0
    png = _read_png(os.path.join(folder, "dice0.750_ok.png"))
    assert png.max() == 255 and (png == np.array(colour(0))).all(axis=-1).any()
    # The FLAIR intensities (20 around, 100 in the square), not the all-zero T1, show.
    for level in (20, 100):
        assert (np.abs(png.astype(int) - level) <= 1).all(axis=-1).sum() > 3000
    missing = {}
    write(SimpleNamespace(subject_id="gone"), _masks(label), _masks(label), missing)
    assert os.listdir(folder) == ["dice0.750_ok.png"] and "overlay_seconds" not in missing
