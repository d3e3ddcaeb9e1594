"""Image metrics for the shapes model: how many subjects, how large, and how close to a reference run.

* ``subject_mask(image, color)``: pixels of a subject colour (saturation above SATURATION and hue nearest
  to that colour's hue among the subject colours of ``shapes_data.COLORS``). Backgrounds of the data set
  stay below 0.1 saturation, so they never count.
* ``subject_count(image, color)``: connected components (8-connected) of that mask that cover at least
  ``min_fraction`` of the canvas (specks are not subjects). Touching subjects of the same colour merge
  into one component, as a viewer would also see one blob.
* ``subject_size(image, color)``: the canvas fraction those components cover together.
* ``fidelity(a, b)``: PSNR in dB (images in [0, 1]; inf when equal) and the largest absolute difference.
* ``background_mask(image)``: the pixels that are neither in a counted subject component of ANY subject
  colour (the components ``subject_count`` finds, each colour in turn) nor within ``EDGE_MARGIN`` pixels
  of one (chessboard distance) nor within ``EDGE_MARGIN`` (16) pixels of the canvas border. The margin
  keeps the soft rim of a subject (blends below the SATURATION threshold, the VAE's ringing around edges)
  out of the background; it is fixed in pixels, as the VAE's ringing is, whatever the canvas size.
* ``background_texture(image)``: high-frequency energy of that background: the mean, over background
  pixels and the three RGB channels, of the squared 5-point Laplacian (4 x centre - the 4 neighbours) of
  the image in [0, 1]; NaN when no background pixel is left. Normalisation: it is a mean per pixel, so it
  does not grow with the canvas, and it is measured at each image's own pixel scale, so it is the energy
  of the finest detail the image holds at its resolution. Fine i.i.d. noise of variance v scores 20 v at
  any size; the same noise enlarged 3x scores far less (nearest: 32/9 v, about 0.18 of it: only the block
  borders change; bilinear: less still), and so does any smooth background (flat or a linear gradient: 0).
  A 1x image and its 3x counterpart with equally fine-grained backgrounds score alike; a 3x background
  made of enlarged 1x-sized blotches scores lower.
* ``seam_score(image, period)``: how much sharper the image changes across the lines at multiples of
  ``period`` pixels (where tiled or windowed methods put their window borders) than across lines in
  general: per direction, the mean squared step between neighbouring pixel rows (columns) on those lines
  over the same mean on every line, the larger of the two directions. About 1 without seams (and for any
  image whose content does not line up with that grid); a hard seam on the grid scores far above 1.

Images: (H, W, 3) or (1, H, W, 3), float in [0, 1] or uint8, torch or numpy.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from shapes_data import COLORS

__all__ = ["EDGE_MARGIN", "MIN_FRACTION", "SATURATION", "background_mask", "background_texture", "fidelity",
           "hue_degrees", "seam_score", "subject_count", "subject_mask", "subject_regions", "subject_size"]

SATURATION = 0.3  # max - min of RGB in [0, 1]; data-set backgrounds stay below 0.1, subjects above 0.55
MIN_FRACTION = 0.002  # smallest component counted, as a fraction of the canvas (131 pixels at 256x256)
# Pixels around subjects (and inside the canvas border) left out of the background: two latent cells of an
# SD-family VAE (8 pixels each). The decoder spreads a subject's edge into rings of ringing out to about
# 12 pixels past the subject mask, at any canvas size (measured on the shapes model at 256 and 768 pixels:
# Laplacian energy 10-1000x the background's at 3-12 pixels from the mask, the background's own from 16 on).
EDGE_MARGIN = 16
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


def _labelled(image, color: str) -> tuple[np.ndarray, np.ndarray]:
    """Component labels of ``color``'s mask (8-connected) and each label's area (index 0: unlabelled)."""
    mask = subject_mask(image, color)
    labels, n = ndimage.label(mask, structure=_EIGHT)
    return labels, np.bincount(labels.ravel(), minlength=n + 1)


def _components(image, color: str, min_fraction: float) -> tuple[np.ndarray, int]:
    labels, areas = _labelled(image, color)
    areas = areas[1:]
    return areas[areas >= min_fraction * labels.size], labels.size


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


def subject_regions(image, min_fraction: float = MIN_FRACTION) -> np.ndarray:
    """Boolean (H, W): the pixels of every counted component (at least ``min_fraction`` of the canvas) of
    every subject colour, i.e. what ``subject_count`` counts for each colour, together."""
    a = _as_array(image)
    regions = np.zeros(a.shape[:2], dtype=bool)
    for color in COLORS:
        labels, areas = _labelled(a, color)
        keep = areas >= min_fraction * labels.size
        keep[0] = False
        regions |= keep[labels]
    return regions


def background_mask(image, margin: int = EDGE_MARGIN, min_fraction: float = MIN_FRACTION) -> np.ndarray:
    """Boolean (H, W): pixels more than ``margin`` pixels (chessboard distance) from every counted subject
    component and from the canvas border. Specks below ``min_fraction`` are not subjects: they stay in."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0; got {margin}")
    outside = ~subject_regions(image, min_fraction)
    if margin == 0:
        return outside
    return ndimage.binary_erosion(outside, structure=_EIGHT, iterations=margin, border_value=0)


_LAPLACE = np.array([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])


def background_texture(image, margin: int = EDGE_MARGIN, min_fraction: float = MIN_FRACTION) -> float:
    """Mean squared 5-point Laplacian of the background (``background_mask``), over its pixels and the RGB
    channels, image in [0, 1]: 0 for flat or linear backgrounds, 20 v for i.i.d. noise of variance v, the
    same at any canvas size (a per-pixel mean at the image's own pixel scale). NaN without background."""
    a = _as_array(image)
    keep = background_mask(a, margin, min_fraction)
    if not keep.any():
        return math.nan
    lap = np.stack([ndimage.convolve(a[..., c], _LAPLACE, mode="reflect") for c in range(3)], axis=-1)
    return float(np.mean(lap[keep] ** 2))


def seam_score(image, period: int, mask=None) -> float:
    """Mean squared step across the grid lines at multiples of ``period`` pixels (inner lines only) over the
    mean squared step across all lines, per direction; the larger direction. ``mask`` (H, W) bool: only steps
    between two pixels of the mask count (the background, say: a subject's edge that happens to lie on a grid
    line is not a seam). NaN without an inner grid line (or no masked step on one)."""
    if period < 2:
        raise ValueError(f"period must be at least 2 pixels; got {period}")
    a = _as_array(image)
    keep = np.ones(a.shape[:2], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    ratios = []
    for axis in (0, 1):
        steps = np.sum(np.diff(a, axis=axis) ** 2, axis=2)  # step k: between lines k and k + 1
        valid = keep[:-1] & keep[1:] if axis == 0 else keep[:, :-1] & keep[:, 1:]
        if axis == 1:
            steps, valid = steps.T, valid.T
        lines = np.arange(period, a.shape[axis], period) - 1  # the step that crosses onto line m * period
        on_grid = valid[lines].sum() if lines.size else 0
        if on_grid and valid.sum():
            overall = (steps * valid).sum() / valid.sum()
            if overall > 0:
                ratios.append(float((steps[lines] * valid[lines]).sum() / on_grid / overall))
    return max(ratios) if ratios else math.nan
