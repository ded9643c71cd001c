import math

import pytest
import torch
from torch import nn

from core.config import ConfigError, build
from train.ema import EMA, EMAConfig, ema_decay
from train.optim import OptimConfig, build_optimizer, build_scheduler, lr_at, no_decay_names


def test_lr_warmup_constant_and_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(s, cfg, 100) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(99, cfg, 100) == 1.0
    cos = OptimConfig(lr=1.0, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, cos, 11) == 1.0
    assert math.isclose(lr_at(5, cos, 11), 0.55)
    assert math.isclose(lr_at(10, cos, 11), 0.1) and math.isclose(lr_at(50, cos, 11), 0.1)


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(schedule="linear")
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        build(OptimConfig, {"lrr": 1})


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.gain = nn.Parameter(torch.ones(4))


def test_no_decay_on_norms_biases_embeddings():
    model = Tiny()
    assert no_decay_names(model) == {"emb.weight", "lin.bias", "norm.weight", "norm.bias", "gain"}
    opt = build_optimizer(model, OptimConfig(weight_decay=0.05))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and [p is model.lin.weight for p in decayed["params"]] == [True]
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 5


def test_scheduler_follows_lr_at():
    model = Tiny()
    cfg = OptimConfig(lr=0.1, warmup_steps=3, schedule="cosine")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    for step in range(10):
        assert math.isclose(opt.param_groups[0]["lr"], lr_at(step, cfg, 10))
        opt.step()
        sched.step()


def test_ema_tracks_weights():
    model = nn.Linear(2, 2)
    ema = EMA(model, EMAConfig(enabled=True, decay=0.5, warmup=False))
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(2.0)
    ema.update(model, step=0)
    assert torch.allclose(ema.shadow["weight"], start + 1.0)
    assert ema_decay(0, EMAConfig(decay=0.999)) == 0.1
    target = nn.Linear(2, 2)
    ema.copy_to(target)
    assert torch.allclose(target.weight, start + 1.0)
