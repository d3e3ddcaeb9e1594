"""Image metrics for the shapes model: how many subjects, how large, and how close to a reference run.

* ``subject_mask(image, color)``: pixels of a subject colour (saturation above SATURATION and hue nearest
  to that colour's hue among the subject colours of ``shapes_data.COLORS``). Backgrounds of the data set
  stay below 0.1 saturation, so they never count.
* ``subject_count(image, color)``: connected components (8-connected) of that mask that cover at least
  ``min_fraction`` of the canvas (specks are not subjects). Touching subjects of the same colour merge
  into one component, as a viewer would also see one blob.
* ``subject_size(image, color)``: the canvas fraction those components cover together.
* ``fidelity(a, b)``: PSNR in dB (images in [0, 1]; inf when equal) and the largest absolute difference.

Images: (H, W, 3) or (1, H, W, 3), float in [0, 1] or uint8, torch or numpy.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from shapes_data import COLORS

__all__ = ["MIN_FRACTION", "SATURATION", "fidelity", "hue_degrees", "subject_count", "subject_mask", "subject_size"]

SATURATION = 0.3  # max - min of RGB in [0, 1]; data-set backgrounds stay below 0.1, subjects above 0.55
MIN_FRACTION = 0.002  # smallest component counted, as a fraction of the canvas (131 pixels at 256x256)
_EIGHT = np.ones((3, 3), dtype=bool)


def _as_array(image) -> np.ndarray:
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"one image at a time; got a batch of {a.shape[0]}")
        a = a[0]
    if a.ndim != 3 or a.shape[-1] < 3:
        raise ValueError(f"expected an (H, W, 3) image; got shape {a.shape}")
    a = a[..., :3]
    return a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of (..., 3) RGB values (the HSV hue)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.where(mx - mn > 0, mx - mn, 1.0)
    h = np.where(mx == r, ((g - b) / d) % 6.0, np.where(mx == g, (b - r) / d + 2.0, (r - g) / d + 4.0))
    return (h * 60.0) % 360.0


_HUES = {name: float(hue_degrees(np.array(rgb))) for name, rgb in COLORS.items()}


def subject_mask(image, color: str) -> np.ndarray:
    """Boolean (H, W): saturated pixels whose hue is nearest to ``color``'s among the subject colours."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {list(COLORS)}; got {color!r}")
    a = _as_array(image)
    saturated = a.max(-1) - a.min(-1) > SATURATION
    hue = hue_degrees(a)
    names = list(_HUES)
    dist = np.stack([np.minimum(np.abs(hue - _HUES[n]), 360.0 - np.abs(hue - _HUES[n])) for n in names])
    return saturated & (dist.argmin(0) == names.index(color))


def _components(image, color: str, min_fraction: float) -> tuple[np.ndarray, int]:
    mask = subject_mask(image, color)
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros(0, dtype=np.int64), mask.size
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    return areas[areas >= min_fraction * mask.size], mask.size


def subject_count(image, color: str, min_fraction: float = MIN_FRACTION) -> int:
    """Number of connected components of ``color`` covering at least ``min_fraction`` of the canvas."""
    areas, _ = _components(image, color, min_fraction)
    return int(areas.size)


def subject_size(image, color: str, min_fraction: float = MIN_FRACTION) -> float:
    """Fraction of the canvas covered by the counted components of ``color`` (0.0 when there are none)."""
    areas, total = _components(image, color, min_fraction)
    return float(areas.sum()) / float(total)


def fidelity(a, b) -> dict[str, float]:
    """{"psnr": dB (inf when identical), "max_error": largest absolute difference}, images in [0, 1]."""
    x, y = _as_array(a), _as_array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    diff = x - y
    mse = float(np.mean(diff ** 2))
    psnr = math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)
    return {"psnr": psnr, "max_error": float(np.abs(diff).max())}
