"""Procedural "one coloured shape on a textured background" images, generated on the fly from a seed.

Each image (256x256 by default, RGB in [0, 1], HWC) holds ONE large subject: a circle, square or
upright triangle in one saturated colour (red, green, blue, yellow), of a large fraction of the canvas,
at a random position, on a textured background of LOW saturation (a grey level with a faint tint and a
grey texture: low-frequency noise, a gradient or stripes). Background pixels never reach the subject
saturation, so ``metrics.subject_count`` can count subjects as connected components of the subject's
colour. Nothing is written to disk: sample ``i`` of seed ``s`` is the same on every machine.

    sample = make_sample(seed=0, index=5)          # ShapeSample(image, color, shape, ...)
    images, prompts = make_batch(seed=0, start=0, count=16)
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

__all__ = [
    "BACKGROUNDS", "COLORS", "SHAPES", "ShapeSample", "make_batch", "make_sample", "prompt_for", "render_shape",
    "SUBJECT_AREA_RANGE",
]

# Saturated subject colours (RGB in [0, 1]); their hues are far apart (about 4, 52, 127, 226 degrees).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.12, 0.25, 0.92),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("noise", "gradient", "stripes")

COLOR_JITTER = 0.04  # per channel, keeps every subject's saturation above 0.55
BG_TINT = 0.03  # per channel around the grey level: background saturation stays below 0.1
# Radius (circle, triangle circumradius) or half side (square) as a fraction of the canvas side.
SIZE_RANGE = {"circle": (0.18, 0.30), "square": (0.15, 0.26), "triangle": (0.22, 0.36)}
# The area those give, as a fraction of the canvas: smallest triangle (area 1.299 r^2) to largest circle.
SUBJECT_AREA_RANGE = (3 * math.sqrt(3.0) / 4 * 0.22 ** 2, math.pi * 0.30 ** 2)
MARGIN = 0.02


@dataclass(frozen=True)
class ShapeSample:
    image: torch.Tensor  # (H, W, 3) float32 in [0, 1]
    color: str
    shape: str
    center: tuple[float, float]  # (x, y) as fractions of the side
    size: float  # radius / half side as a fraction of the side
    background: str

    @property
    def prompt(self) -> str:
        return prompt_for(self.color, self.shape)


def prompt_for(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def _generator(seed: int, index: int) -> torch.Generator:
    # One generator per (seed, index): samples do not depend on the order they are drawn in.
    return torch.Generator().manual_seed(zlib.crc32(f"shapes/{int(seed)}/{int(index)}".encode("ascii")))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _choice(g: torch.Generator, options: tuple | list) -> str:
    return options[int(torch.randint(len(options), (), generator=g))]


def render_shape(shape: str, center: tuple[float, float], size: float, side: int) -> torch.Tensor:
    """Boolean (side, side) mask of a shape; center and size are fractions of the side."""
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    cx, cy = center
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= size ** 2
    if shape == "square":
        return ((x - cx).abs() <= size) & ((y - cy).abs() <= size)
    if shape == "triangle":  # upright equilateral triangle inscribed in a circle of radius `size`
        half = size * math.sqrt(3.0) / 2.0
        top, base = cy - size, cy + size / 2.0
        inside_base = y <= base
        # the two slanted edges: |x - cx| grows linearly from 0 at the apex to `half` at the base
        inside_sides = (x - cx).abs() <= (y - top) / (base - top) * half
        return inside_base & inside_sides & (y >= top)
    raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")


def _background(g: torch.Generator, kind: str, side: int) -> torch.Tensor:
    """(side, side, 3) low-saturation texture: grey level + faint tint + a grey pattern."""
    level = _uniform(g, 0.3, 0.7)
    tint = (torch.rand(3, generator=g) * 2 - 1) * BG_TINT
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    if kind == "noise":  # low-frequency noise survives the 8x8 pooling of the latent mapping
        cells = int(torch.randint(4, 9, (), generator=g))
        grid = torch.randn(1, 1, cells, cells, generator=g)
        pattern = torch.nn.functional.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)[0, 0]
        pattern = 0.08 * pattern + 0.02 * torch.randn(side, side, generator=g)
    elif kind == "gradient":
        angle = _uniform(g, 0.0, 2 * math.pi)
        pattern = 0.3 * ((x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle))
    elif kind == "stripes":
        angle = _uniform(g, 0.0, math.pi)
        period = _uniform(g, 24.0, 64.0) / side
        pattern = 0.08 * torch.sin(2 * math.pi * ((x * math.cos(angle) + y * math.sin(angle)) / period))
    else:
        raise ValueError(f"unknown background {kind!r}; use one of {BACKGROUNDS}")
    grey = (level + pattern).clamp(0.12, 0.88)
    return (grey[..., None] + tint).clamp(0.0, 1.0)


def make_sample(seed: int, index: int, side: int = 256, color: str | None = None, shape: str | None = None) -> ShapeSample:
    """Sample ``index`` of the data set ``seed``; ``color`` / ``shape`` force the subject (tests, prompts)."""
    g = _generator(seed, index)
    color = _choice(g, list(COLORS)) if color is None else color
    shape = _choice(g, SHAPES) if shape is None else shape
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"color must be one of {list(COLORS)} and shape one of {SHAPES}")
    kind = _choice(g, BACKGROUNDS)
    lo, hi = SIZE_RANGE[shape]
    size = _uniform(g, lo, hi)
    # Extent from the centre, so the whole subject stays on the canvas.
    left = size * (math.sqrt(3.0) / 2.0 if shape == "triangle" else 1.0)
    up, down = (size, size / 2.0) if shape == "triangle" else (size, size)
    cx = _uniform(g, left + MARGIN, 1.0 - left - MARGIN)
    cy = _uniform(g, up + MARGIN, 1.0 - down - MARGIN)
    image = _background(g, kind, side)
    rgb = (torch.tensor(COLORS[color]) + (torch.rand(3, generator=g) * 2 - 1) * COLOR_JITTER).clamp(0.0, 1.0)
    mask = render_shape(shape, (cx, cy), size, side)
    image[mask] = rgb
    return ShapeSample(image=image, color=color, shape=shape, center=(cx, cy), size=size, background=kind)


def make_batch(seed: int, start: int, count: int, side: int = 256) -> tuple[torch.Tensor, list[str]]:
    """Samples ``start .. start + count - 1``: images (count, side, side, 3) and their prompts."""
    samples = [make_sample(seed, i, side) for i in range(start, start + count)]
    return torch.stack([s.image for s in samples]), [s.prompt for s in samples]
