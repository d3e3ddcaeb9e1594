"""Structure-guided hires (ASGDiffusion): views, pixel interaction, key-view guidance, windows, schedules."""
from __future__ import annotations

import math

import pytest
import torch

from hires_parallel.algorithms.asg import (
    ASGInputError,
    ASGPlan,
    ASGState,
    Piece,
    asg_denoise,
    combine_level_maps,
    gather_views,
    guidance_weight,
    guide_denoised,
    interaction_permutation,
    step_permutations,
    normalize_maps,
    shape_mask,
    permute_views,
    prompt_token_mask,
    scatter_views,
    structure_steps,
    unpermute_views,
    view_grid,
    window_grid,
    window_taper,
    window_offsets,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _toy_denoise(calls: list | None = None):
    """A deterministic nonlinear stand-in for a model: D = tanh(x) * 0.5 + 0.1 * x.mean() per sample."""

    def denoise(x, sigma, pieces):
        if calls is not None:
            calls.append((x.shape[0], list(pieces)))
        return torch.tanh(x) * 0.5 + 0.1 * x.mean(dim=(1, 2, 3), keepdim=True) / sigma.reshape(-1, 1, 1, 1)

    return denoise


@pytest.mark.parametrize("n_h,n_w", [(2, 2), (3, 3), (1, 2), (2, 3)])
def test_views_are_strided_sublattices_and_gather_is_the_exact_inverse(n_h, n_w):
    x = torch.randn(2, 4, 6 * n_h, 5 * n_w, generator=_gen(1))
    v = scatter_views(x, n_h, n_w)
    assert v.shape == (2, n_h * n_w, 4, 6, 5)
    for a in range(n_h):
        for b in range(n_w):
            assert torch.equal(v[:, a * n_w + b], x[..., a::n_h, b::n_w])
    assert torch.equal(gather_views(v, n_h, n_w), x)


def test_pixel_interaction_is_a_per_location_permutation_undone_exactly():
    g, n, h, w = 2, 9, 4, 5
    views = torch.randn(g, n, 3, h, w, generator=_gen(2))
    perm = interaction_permutation(g, n, h, w, _gen(3))
    assert torch.equal(perm.sort(dim=1).values, torch.arange(n).reshape(1, n, 1, 1).expand(g, n, h, w))
    mixed = permute_views(views, perm)
    # every location holds the same multiset of pixels, and the views really are mixed
    assert torch.equal(mixed.sort(dim=1).values, views.sort(dim=1).values)
    assert not torch.equal(mixed, views)
    assert torch.equal(mixed[1, 4, :, 2, 3], views[1, perm[1, 4, 2, 3], :, 2, 3])
    assert torch.equal(unpermute_views(mixed, perm), views)
    # redrawn from the seed: same seed same permutation, another seed another one
    assert torch.equal(perm, interaction_permutation(g, n, h, w, _gen(3)))
    assert not torch.equal(perm, interaction_permutation(g, n, h, w, _gen(4)))


def test_guidance_keeps_each_views_own_noise_out_of_its_prediction():
    """Views share clean content but not noise: a guided view must still predict the clean content.
    (Pulling eps_i towards the key view's raw eps would leave sigma * (n_i - n_0) in every view.)"""
    clean = torch.randn(1, 1, 4, 8, 8, generator=_gen(5)).expand(1, 4, 4, 8, 8)
    sigma = torch.tensor([10.0])
    views = clean + sigma * torch.randn(1, 4, 4, 8, 8, generator=_gen(6))
    d = clean + 0.05 * torch.randn(1, 4, 4, 8, 8, generator=_gen(16))  # near-oracle predictions
    out = guide_denoised(d, d[:, 0], 1.0)
    assert (out - clean).abs().max() < 0.5  # the predictions stay clean
    for i in range(1, 4):  # w = 1, M = 1: every view takes the key view's prediction
        torch.testing.assert_close(out[:, i], d[:, 0])
    naive = views[:, 1:] - (views[:, :1] - d[:, :1])  # x_i - sigma * eps_0
    assert (naive - clean[:, 1:]).abs().max() > 10  # what the raw-eps reading would have produced


def test_guidance_with_w_zero_equals_plain_view_wise_denoising():
    x = torch.randn(2, 4, 16, 24, generator=_gen(7))
    sigma = torch.tensor([3.0, 3.0])
    plan = ASGPlan(8, 8, guidance=0.0, schedule="constant", pixel_interaction=False)
    out = asg_denoise(x, sigma, _toy_denoise(), plan, step=0, total=10)
    views = scatter_views(x, 2, 3).flatten(0, 1)
    plain = gather_views(_toy_denoise()(views, sigma.repeat_interleave(6), []).reshape(2, 6, 4, 8, 8), 2, 3)
    assert torch.equal(out, plain)
    # the same with pixel interaction on: the shuffled model input is put back exactly
    plan_pi = ASGPlan(8, 8, guidance=0.0, pixel_interaction=True, seed=4)
    out_pi = asg_denoise(x, sigma, _toy_denoise(), plan_pi, step=0, total=10)
    perm = step_permutations([0, 1], 6, 8, 8, seed=4, step=0)
    mixed = permute_views(scatter_views(x, 2, 3), perm).flatten(0, 1)
    ref = unpermute_views(_toy_denoise()(mixed, sigma.repeat_interleave(6), []).reshape(2, 6, 4, 8, 8), perm)
    assert torch.equal(out_pi, gather_views(ref, 2, 3))
    assert not torch.equal(out_pi, plain)  # interaction changed what the model saw


def test_full_guidance_with_mask_one_gives_every_view_the_key_views_prediction():
    x = torch.randn(2, 4, 16, 16, generator=_gen(8))
    sigma = torch.tensor([5.0, 5.0])
    plan = ASGPlan(8, 8, guidance=1.0, schedule="constant", pixel_interaction=False, use_mask=False)
    out = asg_denoise(x, sigma, _toy_denoise(), plan, step=0, total=4)
    views = scatter_views(x, 2, 2)
    d = scatter_views(out, 2, 2)
    for i in range(1, 4):
        torch.testing.assert_close(d[:, i], d[:, 0])
    # view 0 is the key view: untouched
    plain = _toy_denoise()(views.flatten(0, 1), sigma.repeat_interleave(4), []).reshape(d.shape)
    assert torch.equal(d[:, 0], plain[:, 0])
    assert not torch.allclose(d[:, 1], plain[:, 1])
    # w = 0.25: a quarter of the way
    plan_q = ASGPlan(8, 8, guidance=0.25, schedule="constant", pixel_interaction=False, use_mask=False)
    dq = scatter_views(asg_denoise(x, sigma, _toy_denoise(), plan_q, step=0, total=4), 2, 2)
    torch.testing.assert_close(dq[:, 1:], plain[:, 1:] + 0.25 * (plain[:, :1] - plain[:, 1:]))


def test_an_images_shuffles_are_shared_by_its_branches_and_independent_of_the_batch():
    """cond and uncond of one image get the same permutation (else CFG mixes predictions of different inputs);
    an image's permutation does not depend on the other images in the batch."""
    perm = step_permutations([0, 1, 0, 1], 4, 6, 6, seed=7, step=2)
    assert torch.equal(perm[0], perm[2]) and torch.equal(perm[1], perm[3]) and not torch.equal(perm[0], perm[1])
    assert torch.equal(step_permutations([1], 4, 6, 6, seed=7, step=2)[0], perm[1])
    assert not torch.equal(step_permutations([1], 4, 6, 6, seed=7, step=3)[0], perm[1])  # redrawn every step
    x = torch.randn(2, 4, 16, 16, generator=_gen(20))
    x = torch.cat([x, x])  # (cond a, cond b, uncond a, uncond b) with the same inputs
    plan = ASGPlan(8, 8, guidance=0.5, pixel_interaction=True, use_mask=False, seed=7)
    out = asg_denoise(x, torch.tensor(3.0), _toy_denoise(), plan, 0, 4, image_ids=[0, 1, 0, 1], key_ids=[0, 1, 2, 3])
    torch.testing.assert_close(out[:2], out[2:])
    alone = asg_denoise(x[1:2], torch.tensor(3.0), _toy_denoise(), plan, 0, 4, image_ids=[1])
    torch.testing.assert_close(out[1:2], alone)


def test_pixel_interaction_leaves_the_key_view_its_own_pixels():
    """The key view follows one denoising path: its input is always view 0's own latent (shuffled with the
    others, it saw a new mix of the views' noise every step and the layout followed no native run), while
    views 1.. are still mixed among themselves at every location."""
    perm = step_permutations([0, 1], 9, 6, 6, seed=5, step=1)
    assert torch.equal(perm[:, 0], torch.zeros_like(perm[:, 0]))
    assert torch.equal(perm.sort(dim=1).values, torch.arange(9).reshape(1, 9, 1, 1).expand_as(perm))
    assert bool((perm[:, 1:] != torch.arange(1, 9).reshape(1, 8, 1, 1)).any())  # the rest really are mixed
    x = torch.randn(1, 4, 24, 24, generator=_gen(21))
    plan = ASGPlan(8, 8, guidance=0.0, pixel_interaction=True, use_mask=False, seed=5)
    out = asg_denoise(x, torch.tensor([4.0]), _toy_denoise(), plan, step=1, total=4)
    alone = _toy_denoise()(scatter_views(x, 3, 3)[:, 0], torch.tensor([4.0]), [])
    torch.testing.assert_close(scatter_views(out, 3, 3)[:, 0], alone)
    # the primitive without keep_key shuffles view 0 too
    free = interaction_permutation(1, 9, 6, 6, _gen(22))
    assert bool((free[:, 0] != 0).any())


def test_with_pixel_interaction_the_key_is_one_coherent_model_output():
    """w = 1: every location takes the prediction of model slot 0 (one whole image), not a per-pixel
    patchwork of all slots (what un-shuffling before guidance would give: grain)."""
    x = torch.randn(1, 4, 16, 16, generator=_gen(19))
    sigma = torch.tensor([5.0])
    plan = ASGPlan(8, 8, guidance=1.0, schedule="constant", pixel_interaction=True, use_mask=False, seed=3)
    out = asg_denoise(x, sigma, _toy_denoise(), plan, step=0, total=4)
    perm = step_permutations([0], 4, 8, 8, seed=3, step=0)
    slot0 = _toy_denoise()(permute_views(scatter_views(x, 2, 2), perm)[:, 0], sigma, [])
    for v in scatter_views(out, 2, 2)[0]:
        torch.testing.assert_close(v, slot0[0])


def test_mask_weights_the_guidance_per_pixel():
    d = torch.randn(1, 4, 2, 3, 3, generator=_gen(10))
    key = torch.randn(1, 2, 3, 3, generator=_gen(9))
    mask = torch.zeros(1, 4, 1, 3, 3)
    mask[..., 0, 0] = 1.0  # guide only the top-left pixel
    mask[..., 1, 1] = 0.5
    out = guide_denoised(d, key, 1.0, mask)
    torch.testing.assert_close(out[:, 1:, :, 0, 0], key[:, None, :, 0, 0].expand(-1, 3, -1))
    torch.testing.assert_close(out[:, 1:, :, 1, 1], 0.5 * (d[:, 1:, :, 1, 1] + key[:, None, :, 1, 1]))
    assert torch.equal(out[:, 1:, :, 2, 2], d[:, 1:, :, 2, 2])  # mask 0: unchanged
    assert torch.equal(out[:, 0], d[:, 0])  # the key view itself is never guided


def test_schedules_constant_and_cosine_decay():
    assert structure_steps(20, 0.5) == 10 and structure_steps(3, 0.5) == 2 and structure_steps(5, 0.0) == 0
    assert [guidance_weight(s, 4, 0.8, "constant") for s in range(6)] == [0.8, 0.8, 0.8, 0.8, 0.0, 0.0]
    cos = [guidance_weight(s, 4, 0.8, "cosine") for s in range(5)]
    expected = [0.8 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)] + [0.0]
    assert cos == pytest.approx(expected)
    assert cos[0] == pytest.approx(0.8) and all(a > b for a, b in zip(cos, cos[1:]))
    with pytest.raises(ASGInputError, match="schedule"):
        guidance_weight(0, 4, 1.0, "linear")


def test_window_averaging_covers_every_pixel_with_the_right_weights():
    assert window_offsets(32, 16) == [0, 8, 16]
    assert window_offsets(16, 16) == [0]
    assert window_offsets(40, 16) == [0, 8, 16, 24]
    for seed in range(20):  # jitter moves interior windows only; neighbours keep overlapping
        offs = window_offsets(48, 16, jitter=8, generator=_gen(seed))
        assert offs[0] == 0 and offs[-1] == 32
        assert all(0 < b - a <= 16 for a, b in zip(offs, offs[1:]))
    wins = window_grid(32, 48, 16, 16, jitter=3, generator=_gen(1))
    count = torch.zeros(32, 48)
    for t, left in wins:
        count[t:t + 16, left:left + 16] += 1
    assert count.min() >= 1
    # D of constant windows: each pixel's output is the taper-weighted mean over the windows covering it
    x = torch.zeros(1, 1, 32, 48)
    values = {}

    def denoise(xb, sigma, pieces):
        out = []
        for p in pieces:
            values[p.window] = float(len(values) + 1)
            out.append(torch.full((1, 16, 16), values[p.window]))
        return torch.stack(out)

    plan = ASGPlan(16, 16, structure_fraction=0.0, jitter=3, seed=1, batch=4)
    out = asg_denoise(x, torch.tensor(1.0), denoise, plan, step=0, total=2)
    ref, weight = torch.zeros(32, 48), torch.zeros(32, 48)
    used = window_grid(32, 48, 16, 16, 3, torch.Generator().manual_seed(1 * 1_000_003 + 2))
    taper = window_taper(16, 16)
    for (t, left) in used:
        ref[t:t + 16, left:left + 16] += values[(t, left)] * taper
        weight[t:t + 16, left:left + 16] += taper
    torch.testing.assert_close(out[0, 0], ref / weight)
    assert set(values) == set(used)


def test_window_taper_blends_across_window_edges():
    taper = window_taper(16, 16)
    assert taper.min() > 0 and taper.max() == 1 and torch.equal(taper, taper.flip(0)) and torch.equal(taper, taper.T)
    assert torch.all(taper[4:12, 4:12] == 1)  # the inner half is untouched
    assert torch.all(taper[:4, 8].diff() > 0)  # the outer quarter ramps up
    # one side of a 32-wide latent, windows at 0, 8, 16: constant inputs 1, 2, 3 give a result without jumps
    x = torch.zeros(1, 1, 16, 32)

    def denoise(xb, sigma, pieces):
        return torch.stack([torch.full((1, 16, 16), 1.0 + p.window[1] / 8) for p in pieces])

    plan = ASGPlan(16, 16, structure_fraction=0.0, jitter=0)
    row = asg_denoise(x, torch.tensor(1.0), denoise, plan, step=0, total=2)[0, 0, 8]
    assert row[0] == 1 and row[-1] == 3 and torch.all(row.diff() >= -1e-6)
    assert row.diff().abs().max() < 0.35  # a plain average jumps by 0.5 where a window ends


def test_stage_switch_batching_and_pieces():
    calls = []
    x = torch.randn(2, 4, 16, 24, generator=_gen(11))
    plan = ASGPlan(8, 8, batch=5, structure_fraction=0.5)
    asg_denoise(x, torch.tensor([2.0, 2.0]), _toy_denoise(calls), plan, step=1, total=4)  # stage 1: 2 x 6 views
    assert [c[0] for c in calls] == [5, 5, 2]
    pieces = [p for c in calls for p in c[1]]
    assert pieces[0] == Piece(0, view=(0, 0)) and pieces[7] == Piece(1, view=(0, 1))
    calls.clear()
    asg_denoise(x, torch.tensor([2.0, 2.0]), _toy_denoise(calls), plan, step=2, total=4)  # stage 2: 2 x (3 x 5)
    pieces = [p for c in calls for p in c[1]]
    assert len(pieces) == 30 and all(p.window is not None for p in pieces)


def test_asynchronous_guidance_uses_the_previous_steps_key_prediction():
    x0 = torch.randn(1, 4, 16, 16, generator=_gen(12))
    x1 = torch.randn(1, 4, 16, 16, generator=_gen(13))
    sigma = torch.tensor([4.0])
    plan = ASGPlan(8, 8, guidance=1.0, schedule="constant", pixel_interaction=False, asynchronous=True,
                   use_mask=False, structure_fraction=1.0)
    state = ASGState()
    first = asg_denoise(x0, sigma, _toy_denoise(), plan, 0, 4, state)
    sync = ASGPlan(**{**plan.__dict__, "asynchronous": False})
    assert torch.equal(first, asg_denoise(x0, sigma, _toy_denoise(), sync, 0, 4))  # no previous step yet
    out = asg_denoise(x1, sigma, _toy_denoise(), plan, 1, 4, state)
    v0 = scatter_views(x0, 2, 2)
    key_prev = _toy_denoise()(v0[:, 0], sigma, [])
    d = scatter_views(out, 2, 2)
    for i in range(1, 4):
        torch.testing.assert_close(d[:, i], key_prev)
    assert not torch.allclose(out, asg_denoise(x1, sigma, _toy_denoise(), sync, 1, 4))


def test_masks_from_attention_are_normalised_in_model_order_and_cached():
    x = torch.randn(1, 4, 16, 16, generator=_gen(14))
    sigma = torch.tensor([4.0])
    plan = ASGPlan(8, 8, guidance=1.0, schedule="constant", pixel_interaction=True, seed=2, structure_fraction=1.0)
    raw = torch.rand(4, 8, 8, generator=_gen(15)) * 3 + 1
    state = ASGState()
    out_mask = asg_denoise(x, sigma, _toy_denoise(), plan, 0, 4, state, attention=lambda: [raw])
    (_, stored), = state.masks[0]
    expected = shape_mask(raw.reshape(4, 1, 8, 8), plan.mask_saturation)  # the order the model saw
    assert torch.equal(stored, expected) and stored.min() == 0 and stored.max() == 1
    # a call without maps (an uncond-only call, say) reuses the step's cached mask
    again = asg_denoise(x, sigma, _toy_denoise(), plan, 0, 4, state, attention=lambda: [None])
    assert torch.equal(again, out_mask)
    no_mask = asg_denoise(x, sigma, _toy_denoise(), plan, 0, 4, ASGState())
    assert not torch.allclose(no_mask, out_mask)


def test_shape_mask_saturates_the_subject_and_scales_the_rest():
    m = torch.tensor([[[0.0, 1.0], [2.0, 10.0]]])
    assert torch.equal(shape_mask(m, 1.0), normalize_maps(m))  # 1: the raw normalised map
    torch.testing.assert_close(shape_mask(m, 0.15), torch.tensor([[[0.0, 0.1 / 0.15], [1.0, 1.0]]]))
    with pytest.raises(ASGInputError, match="mask_saturation"):
        ASGPlan(8, 8, mask_saturation=0.0)


def test_normalize_and_combine_maps():
    m = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[2.0, 2.0], [2.0, 2.0]]])
    n = normalize_maps(m)
    assert torch.equal(n[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]])) and torch.equal(n[1], torch.ones(2, 2))
    a = torch.rand(3, 4, 4, generator=_gen(16))
    b = torch.rand(3, 2, 2, generator=_gen(17))
    out = combine_level_maps({1: (a * 2, 2), 2: (b, 1)}, (4, 4))
    up = torch.nn.functional.interpolate(b.unsqueeze(1), size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(out, (a * 2 + up) / 3)


def test_prompt_tokens_exclude_start_end_and_padding():
    g = _gen(18)
    prompt = torch.randn(5, 32, generator=g)
    pad = torch.randn(32, generator=g)
    chunk = torch.cat([torch.randn(1, 32, generator=g), prompt, pad + 0.01 * torch.randn(71, 32, generator=g)])
    full = torch.cat([chunk[:1], torch.randn(76, 32, generator=g)])  # 75 prompt tokens and the end token
    ctx = torch.stack([torch.cat([chunk, chunk]), torch.cat([full, chunk])])
    mask = prompt_token_mask(ctx)
    assert mask.shape == (2, 154)
    expected = torch.zeros(77, dtype=torch.bool)
    expected[1:6] = True
    assert torch.equal(mask[0], torch.cat([expected, expected]))
    # a full chunk: 75 prompt tokens between start and end
    full_expected = torch.ones(77, dtype=torch.bool)
    full_expected[0] = full_expected[76] = False
    assert torch.equal(mask[1], torch.cat([full_expected, expected]))
    # not CLIP-shaped: every token counts
    assert prompt_token_mask(torch.randn(1, 10, 8)).all()


def test_clear_errors_for_sizes():
    with pytest.raises(ASGInputError, match="native size is 16x16") as e:
        view_grid(8, 32, 16, 16)
    assert e.value.user_facing is True
    with pytest.raises(ASGInputError, match="not a whole multiple"):
        view_grid(24, 32, 16, 16)
    assert view_grid(16, 48, 16, 16) == (1, 3)
    with pytest.raises(ASGInputError, match="guidance"):
        ASGPlan(8, 8, guidance=1.5)
    with pytest.raises(ASGInputError, match="schedule"):
        ASGPlan(8, 8, schedule="linear")
