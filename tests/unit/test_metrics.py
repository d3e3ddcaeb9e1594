"""benchmarks/metrics.py on synthetic images whose subject counts and sizes are known by construction."""
import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import metrics  # noqa: E402
from shapes_data import COLORS  # noqa: E402

SIDE = 256


def background(seed: int = 0, amplitude: float = 0.25) -> np.ndarray:
    """Grey noise with a faint tint: strong texture, low saturation."""
    rng = np.random.default_rng(seed)
    grey = 0.5 + amplitude * rng.uniform(-1, 1, (SIDE, SIDE, 1))
    return np.clip(grey + np.array([0.02, -0.01, 0.03]), 0, 1)


def square(img: np.ndarray, x: int, y: int, side: int, color: str) -> int:
    img[y:y + side, x:x + side] = COLORS[color]
    return side * side


def disc(img: np.ndarray, cx: float, cy: float, r: float, color: str) -> int:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    mask = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    img[mask] = COLORS[color]
    return int(mask.sum())


def test_noise_background_has_no_subject_of_any_colour():
    img = background(amplitude=0.45)
    for color in COLORS:
        assert metrics.subject_count(img, color) == 0
        assert metrics.subject_size(img, color) == 0.0


@pytest.mark.parametrize("n", [1, 2, 3])
def test_separate_subjects_are_counted(n):
    img = background(n)
    area = sum(square(img, 10 + 80 * i, 20 + 60 * i, 50, "red") for i in range(n))
    assert metrics.subject_count(img, "red") == n
    assert metrics.subject_size(img, "red") == pytest.approx(area / SIDE ** 2)
    for other in ("green", "blue", "yellow"):
        assert metrics.subject_count(img, other) == 0


def test_touching_subjects_of_one_colour_are_one_component_even_at_a_corner():
    img = background()
    square(img, 20, 20, 60, "blue")
    square(img, 80, 20, 60, "blue")  # shares an edge
    square(img, 140, 80, 40, "blue")  # touches the second one at a corner only (8-connectivity)
    assert metrics.subject_count(img, "blue") == 1


def test_touching_subjects_of_different_colours_are_counted_per_colour():
    img = background()
    square(img, 20, 20, 60, "red")
    square(img, 80, 20, 60, "green")
    square(img, 140, 20, 60, "yellow")
    assert [metrics.subject_count(img, c) for c in ("red", "green", "yellow", "blue")] == [1, 1, 1, 0]


def test_specks_below_the_minimum_size_do_not_count():
    img = background()
    square(img, 30, 30, 60, "green")
    square(img, 200, 200, 8, "green")  # 64 px, under 0.2% of 65536
    assert metrics.subject_count(img, "green") == 1
    assert metrics.subject_count(img, "green", min_fraction=0.0) == 2
    assert metrics.subject_size(img, "green") == pytest.approx(3600 / SIDE ** 2)


def test_size_of_a_disc_and_blends_with_the_background():
    img = background()
    area = disc(img, 128, 128, 70, "yellow")
    assert metrics.subject_size(img, "yellow") == pytest.approx(area / SIDE ** 2)
    assert area / SIDE ** 2 == pytest.approx(math.pi * 70 ** 2 / SIDE ** 2, rel=0.01)
    # a soft edge (half subject colour, half grey) still has the subject's hue and counts
    blend = 0.5 * np.array(COLORS["red"]) + 0.5 * np.array([0.5, 0.5, 0.5])
    assert metrics.subject_mask(blend.reshape(1, 1, 3), "red").all()
    assert not metrics.subject_mask(blend.reshape(1, 1, 3), "yellow").any()


def test_image_formats_agree():
    import torch

    img = background()
    square(img, 40, 40, 70, "red")
    square(img, 150, 150, 70, "red")
    as_uint8 = (img * 255).round().astype(np.uint8)
    as_batch = torch.from_numpy(img)[None].float()
    assert metrics.subject_count(as_uint8, "red") == metrics.subject_count(as_batch, "red") == 2
    with pytest.raises(ValueError):
        metrics.subject_count(np.concatenate([img[None], img[None]]), "red")
    with pytest.raises(ValueError):
        metrics.subject_mask(img, "purple")


def test_fidelity():
    a = background()
    same = metrics.fidelity(a, a.copy())
    assert same["psnr"] == math.inf and same["max_error"] == 0.0
    b = np.clip(a + 0.1, 0, 1)
    exact_mse = float(np.mean((b - a) ** 2))
    f = metrics.fidelity(a, b)
    assert f["psnr"] == pytest.approx(10 * math.log10(1 / exact_mse))
    assert f["max_error"] == pytest.approx(0.1)
    c = a.copy()
    c[0, 0, 0] = 1.0 - c[0, 0, 0]
    assert metrics.fidelity(a, c)["max_error"] == pytest.approx(abs(1 - 2 * a[0, 0, 0]))
    with pytest.raises(ValueError):
        metrics.fidelity(a, a[:128])


# ---------------------------------------------------------------- background texture

def grey_noise(side: int, seed: int = 0, amplitude: float = 0.25) -> np.ndarray:
    """I.i.d. grey noise around 0.5 (variance amplitude^2 / 3), the same on every channel, with a faint tint."""
    rng = np.random.default_rng(seed)
    grey = 0.5 + amplitude * rng.uniform(-1, 1, (side, side, 1))
    return grey + np.array([0.02, -0.01, 0.03])


def enlarged(small: np.ndarray, factor: int, mode: str) -> np.ndarray:
    import torch

    t = torch.from_numpy(small).permute(2, 0, 1)[None]
    kw = {} if mode == "nearest" else {"align_corners": False}
    return torch.nn.functional.interpolate(t, scale_factor=factor, mode=mode, **kw)[0].permute(1, 2, 0).numpy()


def test_flat_and_linear_backgrounds_have_no_texture():
    flat = np.full((SIDE, SIDE, 3), 0.45) + np.array([0.02, -0.01, 0.03])
    assert metrics.background_texture(flat) == pytest.approx(0.0, abs=1e-20)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    ramp = 0.3 + 0.4 * (0.6 * xx + 0.4 * yy)[..., None] + np.zeros(3)
    assert metrics.background_texture(ramp) < 1e-20  # a linear gradient has no curvature
    assert metrics.background_texture((flat * 255).round().astype(np.uint8)) == pytest.approx(0.0, abs=1e-20)


def test_fine_noise_scores_high_and_the_same_at_every_size():
    amplitude = 0.25
    expected = 20 * amplitude ** 2 / 3  # var(4 x - 4 neighbours) = 16 v + 4 v for i.i.d. noise of variance v
    small, large = metrics.background_texture(grey_noise(SIDE)), metrics.background_texture(grey_noise(3 * SIDE, 1))
    assert small == pytest.approx(expected, rel=0.03)
    assert large == pytest.approx(expected, rel=0.03)  # a per-pixel mean: the canvas size does not count


@pytest.mark.parametrize("mode,at_most", [("nearest", 0.25), ("bilinear", 0.1)])
def test_noise_enlarged_3x_into_blotches_scores_much_lower_than_fine_noise(mode, at_most):
    fine = metrics.background_texture(grey_noise(3 * SIDE, 1))
    blotches = enlarged(grey_noise(SIDE, 2), 3, mode)  # the same kind of noise, 3 pixels a grain
    assert blotches.shape == (3 * SIDE, 3 * SIDE, 3)
    score = metrics.background_texture(blotches)
    assert 0 < score < at_most * fine, (score, fine)
    if mode == "nearest":  # only the block borders change: (4 x 2 v + 4 x 6 v) / 9 pixels of a 3x3 block
        assert score == pytest.approx(32 / 9 * 0.25 ** 2 / 3, rel=0.05)
    # the 1x original of those blotches scores as fine noise does: the ratio to it is what the benchmark reports
    assert score / metrics.background_texture(grey_noise(SIDE, 2)) < at_most


@pytest.mark.parametrize("soft", [False, True])
def test_subject_edges_do_not_count(soft):
    from scipy import ndimage

    flat = np.full((SIDE, SIDE, 3), 0.5) + np.array([0.02, -0.01, 0.03])
    img = flat.copy()
    disc(img, 90, 100, 50, "red")
    square(img, 150, 150, 70, "blue")
    if soft:  # a blurred rim, as a VAE decodes it: part of it stays below the subject saturation
        img = np.stack([ndimage.gaussian_filter(img[..., c], 1.0) for c in range(3)], axis=-1)
    assert metrics.subject_count(img, "red") == 1 and metrics.subject_count(img, "blue") == 1
    assert metrics.background_texture(img) < 1e-8
    assert metrics.background_texture(img, margin=0) > 1e-5  # without the margin the rims would count
    # on a noisy background the subjects take pixels away but do not change the statistic
    noisy = grey_noise(SIDE, 3)
    with_subjects = noisy.copy()
    disc(with_subjects, 90, 100, 50, "red")
    square(with_subjects, 150, 150, 70, "blue")
    assert metrics.background_texture(with_subjects) == pytest.approx(metrics.background_texture(noisy), rel=0.05)


def test_background_mask_leaves_out_subjects_their_margin_and_the_border():
    img = np.full((SIDE, SIDE, 3), 0.5)
    square(img, 100, 100, 50, "green")
    square(img, 10, 200, 5, "green")  # a speck: not a subject, stays in the background
    mask = metrics.background_mask(img, margin=4)
    assert not mask[96:154, 96:154].any() and mask[95, 120] and mask[154, 120]  # 4 pixels around the square
    assert not mask[:4].any() and not mask[:, -4:].any() and mask[4, 4]  # the canvas border
    assert mask[202, 12]
    assert metrics.background_mask(img, margin=0).sum() == SIDE * SIDE - 2500
    assert metrics.subject_regions(img).sum() == 2500
    full = np.zeros((SIDE, SIDE, 3))
    full[:] = COLORS["yellow"]
    assert math.isnan(metrics.background_texture(full))  # no background at all
    with pytest.raises(ValueError):
        metrics.background_mask(img, margin=-1)


def test_seam_score_is_near_one_without_seams_and_high_on_a_window_grid():
    rng = np.random.default_rng(3)
    smooth = np.clip(0.5 + 0.1 * rng.standard_normal((512, 512, 3)), 0, 1)
    assert 0.8 < metrics.seam_score(smooth, 128) < 1.25
    # the same image with every 128 x 128 tile shifted in brightness: hard seams on the grid
    tiles = smooth.copy()
    for i in range(4):
        for j in range(4):
            tiles[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] += 0.15 * ((i + j) % 2 - 0.5)
    assert metrics.seam_score(np.clip(tiles, 0, 1), 128) > 1.8  # step 0.15 on noise of step variance 0.02: 2.1
    # seams on another grid do not score on this one; rows only (one direction) still score
    assert metrics.seam_score(np.clip(tiles, 0, 1), 96) < 1.5
    rows = smooth.copy()
    rows[256:] += 0.2
    assert metrics.seam_score(np.clip(rows, 0, 1), 128) > 1.4  # one of the three row lines: 1.7
    # a mask keeps content off the grid lines out: a bright bar starting on line 256 is not a seam of the background
    bar = smooth.copy()
    bar[256:270] = 1.0  # its top edge lies on the line
    assert metrics.seam_score(bar, 128) > 3  # unmasked: the bar edge reads as a seam (4.9)
    background = np.ones((512, 512), dtype=bool)
    background[240:272] = False
    assert 0.8 < metrics.seam_score(bar, 128, background) < 1.25
    assert math.isnan(metrics.seam_score(smooth[:100, :100], 128))
    assert math.isnan(metrics.seam_score(smooth, 128, np.zeros((512, 512), dtype=bool)))
    with pytest.raises(ValueError):
        metrics.seam_score(smooth, 1)
