import math
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from train.masking import mask_rate
from train.sampler import (
    choose_remask,
    codes_to_colors,
    guided_logits,
    gumbel_temperature,
    maskgit,
    remask_count,
    save_grid,
)


def test_remask_count_follows_cosine_and_always_progresses():
    length, steps = 64, 8
    masked = torch.tensor([64])
    for i in range(steps):
        keep = remask_count(length, i, steps, masked)
        if i < steps - 1:
            assert keep.item() == min(math.floor(length * mask_rate((i + 1) / steps)), masked.item() - 1)
        assert keep.item() < masked.item()
        masked = keep
    assert masked.item() == 0


def test_temperature_anneals_from_two_to_zero():
    temps = [gumbel_temperature(i, 4) for i in range(4)]
    assert temps == [1.5, 1.0, 0.5, 0.0] and gumbel_temperature(0, 48) < 2.0


def test_choose_remask_picks_least_confident_without_noise():
    conf = torch.tensor([[0.1, -3.0, torch.inf, -1.0]])
    remask = choose_remask(conf, torch.tensor([2]), temperature=0.0, generator=torch.Generator().manual_seed(0))
    assert remask.tolist() == [[False, True, False, True]]


class Oracle(torch.nn.Module):
    """Predicts `target` (B, L) perfectly when given the 'right' text, uniformly otherwise.
    Records the condition values it was called with."""

    def __init__(self, target, codebook):
        super().__init__()
        self.cfg = SimpleNamespace(mask_token_id=codebook, codebook_size=codebook)
        self.target, self.codebook, self.timesteps = target, codebook, []
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, codes, hidden, pooled, micro, timestep):
        self.timesteps.append(timestep.clone())
        b = codes.shape[0]
        logits = torch.zeros(b, codes[0].numel(), self.codebook)
        sure = pooled[:, 0] > 0  # conditional branch
        onehot = torch.nn.functional.one_hot(self.target.repeat(b // len(self.target), 1), self.codebook).float()
        return torch.where(sure[:, None, None], 4.0 * onehot, logits)


def test_maskgit_reproduces_a_confident_model_and_uses_cond_value():
    target = torch.randint(0, 10, (2, 9), generator=torch.Generator().manual_seed(0))
    model = Oracle(target, 10)
    hidden, pooled = torch.zeros(2, 3, 4), torch.ones(2, 4)
    neg_h, neg_p = torch.zeros(1, 3, 4), -torch.ones(1, 4)
    ticks = []
    codes = maskgit(model, hidden, pooled, neg_h, neg_p, torch.zeros(2, 5), (3, 3), steps=6, cfg=9.0, seed=0,
                    on_step=lambda: ticks.append(len(model.timesteps)))
    assert torch.equal(codes.view(2, 9), target)
    assert ticks == [1, 2, 3, 4, 5, 6]  # `train sample`'s progress: one tick after each decoding step
    # first call: everything masked -> condition value 1.0 (cond_value of the ratio); later ones decrease
    first = model.timesteps[0]
    assert torch.allclose(first, torch.ones(4)) and model.timesteps[-1].max() < 1.0


def test_guided_logits_formula():
    class Lin(torch.nn.Module):
        def forward(self, codes, hidden, pooled, micro, timestep):
            return pooled[:, None, :2]

    pooled, neg = torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 1.0]])
    codes, t = torch.zeros(1, 1, 1, dtype=torch.long), torch.ones(1)
    h = torch.zeros(1, 1, 1)
    out = guided_logits(Lin(), codes, h, pooled, h, neg, torch.zeros(1, 5), t, 2.0)
    assert torch.allclose(out, torch.tensor([[[5.0, 1.0]]]))  # 1 + 2 * (3 - 1)
    assert torch.allclose(guided_logits(Lin(), codes, h, pooled, h, neg, torch.zeros(1, 5), t, 1.0), pooled[:, None])


def test_save_grid_and_false_colours(tmp_path):
    codes = torch.tensor([[[0, 1], [1, 0]]]).repeat(3, 1, 1)
    images = codes_to_colors(codes, 4, scale=8)
    assert images.shape == (3, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    path = save_grid(images, tmp_path / "g.png", nrow=2)
    arr = np.asarray(Image.open(path))
    assert arr.shape == (32, 32, 3)
    assert np.array_equal(arr[:16, :16], arr[:16, 16:])  # same codes -> same colours
    assert (arr[16:, 16:] == 0).all()  # the empty 4th cell
