"""FLOPs arithmetic checked against the real model: parameter counts and torch's FLOP counter."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from train.flops import (GPU_PEAK_TFLOPS, PAPER_H100_DAYS, PAPER_STAGES, flops_per_token, forward_flops,
                         gpu_days, paper_implied_mfu, paper_total_flops, param_count, plan)
from train.model import MODELS, ModelConfig, build_model, count_params


pytestmark = pytest.mark.usefixtures("one_torch_thread")


ODD = dataclasses.replace(MODELS["debug"], dual_blocks=2, single_blocks=3, mlp_ratio=2.0, text_dim=48,
                          pooled_dim=40, micro_cond_embed_dim=8, downsample=True)


def meta_model(cfg: ModelConfig) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(cfg)


def counted_flops(cfg: ModelConfig, grid: tuple[int, int], text_len: int, backward: bool = False) -> float:
    """FLOPs torch's own counter sees for one sample (meta tensors: no memory, any size)."""
    model, b = meta_model(cfg), 2
    with torch.device("meta"):
        batch = (torch.randint(0, cfg.vocab_size, (b, *grid)), torch.randn(b, text_len, cfg.text_dim),
                 torch.randn(b, cfg.pooled_dim), torch.rand(b, cfg.micro_cond_dim), torch.rand(b))
    with FlopCounterMode(display=False) as counter:
        out = model(*batch)
        if backward:
            out.float().sum().backward()
    return counter.get_total_flops() / b


@pytest.mark.parametrize("name", ["debug", "meissonic-1b", "meissonic-1b-1024"])
def test_param_count_equals_the_model(name):
    assert param_count(MODELS[name]) == count_params(meta_model(MODELS[name]))


def test_param_count_follows_every_config_field():
    assert param_count(ODD) == count_params(meta_model(ODD))
    assert param_count(MODELS["meissonic-1b-1024"]) == 1_006_946_304


@pytest.mark.parametrize("name, grid, text_len", [("debug", (6, 8), 77), ("meissonic-1b", (16, 16), 77),
                                                  ("meissonic-1b-1024", (64, 64), 77), ("odd", (4, 6), 9)])
def test_forward_flops_equal_torch_flop_counter(name, grid, text_len):
    cfg = ODD if name == "odd" else MODELS[name]
    assert forward_flops(cfg, grid, text_len) == counted_flops(cfg, grid, text_len)


def test_training_flops_are_three_forwards():
    cfg, grid = dataclasses.replace(MODELS["meissonic-1b"], dual_blocks=2, single_blocks=4), (16, 16)
    ratio = counted_flops(cfg, grid, 77, backward=True) / (flops_per_token(cfg, grid) * 256)
    # backward skips input gradients of the first layers (token embedding, text inputs): a bit under 1
    assert 0.9 < ratio <= 1.0


def test_flops_per_token_grows_with_attention_and_shrinks_with_compression():
    cfg = MODELS["meissonic-1b"]
    n_dense = 6 * param_count(cfg)
    at_256, at_512 = flops_per_token(cfg, (16, 16)), flops_per_token(cfg, (32, 32))
    # without text, a longer sequence means more attention work per token
    assert flops_per_token(cfg, (32, 32), text_len=0) > flops_per_token(cfg, (16, 16), text_len=0)
    # with 77 text tokens, their share per image token shrinks faster than attention grows
    assert at_512 < at_256 and flops_per_token(cfg, (16, 16), text_len=0) < at_256
    # per-sample AdaLN weights (~26% of N) are not per-token work; text + attention add the rest
    assert 0.6 * n_dense < at_256 < n_dense
    at_1024 = flops_per_token(MODELS["meissonic-1b-1024"], (64, 64))
    assert at_1024 < at_512 / 3  # 2x2 compression: the blocks see a quarter of the tokens


def test_plan_arithmetic():
    cfg, grid = MODELS["meissonic-1b"], (32, 32)
    p = plan(cfg, grid, steps=1000, batch_size=512, gpus=8, gpu="h100", mfu=0.5)
    total = flops_per_token(cfg, grid) * 1024 * 512 * 1000
    assert p["total_flops"] == pytest.approx(total)
    assert p["gpu_days"] == pytest.approx(total / (989e12 * 0.5) / 86400)
    assert p["wall_days"] == pytest.approx(p["gpu_days"] / 8)
    assert p["images_per_s"] == pytest.approx(512 * 1000 / (p["wall_days"] * 86400))
    assert p["paper_h100_days_all_stages"] == PAPER_H100_DAYS == 48.0
    more = plan(cfg, grid, steps=1000, batch_size=512, gpus=16, gpu="h100", mfu=0.25)
    assert more["gpu_days"] == pytest.approx(2 * p["gpu_days"]) and more["wall_days"] == pytest.approx(p["wall_days"])
    a100 = plan(cfg, grid, steps=1000, batch_size=512, gpus=8, gpu="a100", mfu=0.5)
    assert a100["gpu_days"] == pytest.approx(p["gpu_days"] * 989 / 312)
    assert a100["h100_days_at_same_mfu"] == pytest.approx(p["gpu_days"])
    assert GPU_PEAK_TFLOPS["h200"] == GPU_PEAK_TFLOPS["h100"]


def test_paper_implied_mfu():
    cfg = MODELS["meissonic-1b"]
    manual = sum(flops_per_token(dataclasses.replace(cfg, downsample=ds), g) * g[0] * g[1] * b * s
                 for _, g, b, s, ds in PAPER_STAGES)
    assert paper_total_flops(cfg) == pytest.approx(manual)
    assert paper_implied_mfu(cfg) == pytest.approx(manual / (48 * 86400 * 989e12))
    assert 0.05 < paper_implied_mfu(cfg) < 0.3


@pytest.mark.parametrize("kwargs, msg", [({"gpu": "v100"}, "unknown gpu"), ({"mfu": 0.0}, "mfu"),
                                         ({"gpus": 0}, "gpus")])
def test_plan_rejects_bad_input(kwargs, msg):
    args = {"steps": 10, "batch_size": 4, "gpus": 1, "gpu": "h100", "mfu": 0.4} | kwargs
    with pytest.raises(ValueError, match=msg):
        plan(MODELS["debug"], (8, 8), **args)


def test_gpu_days_direct():
    assert gpu_days(989e12 * 86400, "h100", 1.0) == pytest.approx(1.0)
