import math

import torch

from train.masking import (
    apply_cfg_dropout,
    cfg_drop_mask,
    cond_value,
    mask_rate,
    mask_ratio,
    mask_tokens,
    masked_ce,
    num_masked,
)


def test_mask_rate_is_cosine():
    assert mask_rate(0.0) == 1.0
    assert abs(mask_rate(1.0)) < 1e-12
    assert math.isclose(mask_rate(0.5), math.cos(math.pi / 4))
    t = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(mask_rate(t), torch.cos(math.pi * t / 2))


def test_num_masked_at_least_one_at_most_all():
    assert num_masked(torch.tensor([0.0, 1e-6, 0.5, 1.0]), 16).tolist() == [1, 1, 8, 16]


def test_mask_tokens_counts_and_values():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 10, (64, 4, 4), generator=g)
    t = torch.rand(64, generator=g)
    masked, mask = mask_tokens(codes, t, mask_id=99, generator=g)
    assert masked.shape == codes.shape and mask.dtype == torch.bool
    assert torch.equal(mask.sum((1, 2)), num_masked(mask_rate(t), 16))
    assert (mask.sum((1, 2)) >= 1).all()
    assert (masked[mask] == 99).all() and torch.equal(masked[~mask], codes[~mask])
    # t=1 -> ratio 0 -> still exactly one token masked
    _, one = mask_tokens(codes[:3], torch.ones(3), 99, g)
    assert one.sum((1, 2)).tolist() == [1, 1, 1]


def test_mask_tokens_positions_uniform_and_reproducible():
    codes = torch.zeros(4000, 2, 2, dtype=torch.long)
    t = torch.full((4000,), 2 / 3)  # ratio 0.5 -> 2 of 4 masked
    _, mask = mask_tokens(codes, t, 7, torch.Generator().manual_seed(1))
    freq = mask.float().mean(0)
    assert torch.allclose(freq, torch.full_like(freq, 0.5), atol=0.04)
    _, again = mask_tokens(codes, t, 7, torch.Generator().manual_seed(1))
    assert torch.equal(mask, again)


def test_cond_value_is_the_actual_ratio():
    mask = torch.tensor([[True, False, False, False], [True, True, True, True]])
    assert torch.allclose(cond_value(mask_ratio(mask)), torch.tensor([0.25, 1.0]))


def test_masked_ce_only_counts_masked_positions():
    targets = torch.tensor([[1, 2, 0]])
    logits = torch.full((1, 3, 3), -20.0)
    logits[0, 0, 1] = 20  # right at a masked position
    logits[0, 1, 0] = 20  # wrong, but unmasked: ignored
    logits[0, 2, 1] = 20  # wrong at a masked position
    mask = torch.tensor([[True, False, True]])
    expected = (0.0 + 40.0) / 2
    assert abs(masked_ce(logits, targets, mask).item() - expected) < 1e-3
    assert masked_ce(logits, targets, torch.tensor([[True, False, False]])).item() < 1e-6


def test_cfg_dropout_rate_and_both_tensors_replaced():
    b, p = 20000, 0.1
    drop = cfg_drop_mask(b, p, torch.Generator().manual_seed(0))
    assert abs(drop.float().mean().item() - p) < 0.01
    hidden, pooled = torch.randn(8, 3, 4), torch.randn(8, 5)
    e_h, e_p = torch.full((1, 3, 4), 7.0), torch.full((1, 5), 9.0)
    d = torch.tensor([True, False] * 4)
    h2, p2 = apply_cfg_dropout(hidden, pooled, e_h, e_p, d)
    assert (h2[d] == 7).all() and (p2[d] == 9).all()  # BOTH replaced where dropped
    assert torch.equal(h2[~d], hidden[~d]) and torch.equal(p2[~d], pooled[~d])  # others untouched
    assert torch.equal(apply_cfg_dropout(hidden, pooled, e_h, e_p, torch.zeros(8, dtype=torch.bool))[0], hidden)
