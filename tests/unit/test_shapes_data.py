"""benchmarks/shapes_data.py: deterministic, one subject per image, subject colours never in the background."""
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import metrics  # noqa: E402
import shapes_data  # noqa: E402
from shapes_model import LatentMap  # noqa: E402  (pure torch; ComfyUI is imported only by the loaders)

N = 48


@pytest.fixture(scope="module")
def samples():
    return [shapes_data.make_sample(seed=3, index=i) for i in range(N)]


def test_deterministic_and_order_independent(samples):
    again = shapes_data.make_sample(seed=3, index=7)
    assert torch.equal(again.image, samples[7].image) and again.prompt == samples[7].prompt
    images, prompts = shapes_data.make_batch(seed=3, start=5, count=3)
    assert torch.equal(images, torch.stack([s.image for s in samples[5:8]]))
    assert prompts == [s.prompt for s in samples[5:8]]
    assert not torch.equal(shapes_data.make_sample(seed=4, index=7).image, samples[7].image)


def test_every_image_has_exactly_one_subject_and_no_other_colour(samples):
    for s in samples:
        assert s.image.shape == (256, 256, 3) and 0 <= float(s.image.min()) and float(s.image.max()) <= 1
        assert metrics.subject_count(s.image, s.color) == 1, s
        assert all(metrics.subject_count(s.image, c) == 0 for c in shapes_data.COLORS if c != s.color), s


def test_subject_colour_is_distinct_from_the_background(samples):
    for s in samples:
        mask = shapes_data.render_shape(s.shape, s.center, s.size, 256)
        sat = s.image.max(-1).values - s.image.min(-1).values
        assert float(sat[~mask].max()) < 0.1 < metrics.SATURATION < 0.55 < float(sat[mask].min())
        assert torch.from_numpy(metrics.subject_mask(s.image, s.color)).eq(mask).all()


def test_subjects_are_large_and_the_data_set_is_varied(samples):
    lo, hi = shapes_data.SUBJECT_AREA_RANGE
    for s in samples:
        assert lo * 0.95 <= metrics.subject_size(s.image, s.color) <= hi * 1.05
    assert {s.color for s in samples} == set(shapes_data.COLORS)
    assert {s.shape for s in samples} == set(shapes_data.SHAPES)
    assert {s.background for s in samples} == set(shapes_data.BACKGROUNDS)
    assert len({round(s.center[0], 2) for s in samples}) > N // 2


def test_forced_subject_and_bad_names():
    s = shapes_data.make_sample(0, 1, side=128, color="blue", shape="triangle")
    assert s.prompt == "a blue triangle" and s.image.shape == (128, 128, 3)
    assert metrics.subject_count(s.image, "blue") == 1
    with pytest.raises(ValueError):
        shapes_data.make_sample(0, 1, color="purple")


def test_the_latent_mapping_keeps_one_subject(samples):
    """What the model is trained on (8x8 pooled latents) still decodes to one countable subject."""
    latent_map = LatentMap()
    images = torch.stack([s.image for s in samples[:16]]).permute(0, 3, 1, 2)
    decoded = ((latent_map.decode(latent_map.encode(images * 2 - 1)) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)
    for s, img in zip(samples, decoded):
        assert metrics.subject_count(img, s.color) == 1
        assert metrics.subject_size(img, s.color) == pytest.approx(metrics.subject_size(s.image, s.color), abs=0.03)
