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
