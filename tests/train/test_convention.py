"""Conventions: what the model's timestep input and the text padding are, for runs trained here
and for the released weights (upstream's trainer, pipeline and tokenizer, reproduced exactly)."""
from __future__ import annotations

import math

import pytest
import torch

from train.convention import CONVENTIONS, EOT_TOKEN_ID, get, pad_after_eot
from train.masking import cond_value
from train.model import MODELS, build_model
from train.text_encoder import TextEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TESSERA, MEISSONIC = CONVENTIONS["tessera"], CONVENTIONS["meissonic"]


def sinusoid_argument(model, timestep: torch.Tensor) -> torch.Tensor:
    """What the model's timestep sinusoid receives for `timestep` (captured at time_text_embed)."""
    seen = []
    handle = model.time_text_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    b = timestep.shape[0]
    cfg = model.cfg
    model.conditioning(torch.zeros(b, cfg.pooled_dim), torch.zeros(b, cfg.micro_cond_dim), timestep)
    handle.remove()
    return seen[0]


def test_tessera_feeds_the_masked_ratio_in_training_and_sampling():
    ratio, drawn = torch.tensor([0.25, 0.5, 1.0]), torch.tensor([0.26, 0.49, 0.99])
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(TESSERA.train_timestep(ratio, drawn, dtype), cond_value(ratio))
        assert torch.equal(TESSERA.sample_timestep(3, 8, ratio, dtype), cond_value(ratio))
    model = build_model(MODELS["debug"])
    assert torch.equal(sinusoid_argument(model, cond_value(ratio)), ratio * 1000)  # fp32, exact


def test_meissonic_training_input_is_upstreams_bf16_rounded_r_times_a_million():
    """Upstream: timestep = mask_prob * 1000; transformer: timestep.to(hidden dtype) * 1000."""
    drawn = torch.cos(torch.rand(64, generator=torch.Generator().manual_seed(0)) * math.pi / 2)
    ratio = torch.round(drawn * 256) / 256  # what was actually masked of 256 tokens (not used upstream)
    model = build_model(MODELS["debug"])
    for dtype in (torch.float32, torch.bfloat16):
        upstream = ((drawn * 1000).to(dtype) * 1000).float()
        got = sinusoid_argument(model, MEISSONIC.train_timestep(ratio, drawn, dtype))
        assert torch.equal(got, upstream), dtype
    bf16 = sinusoid_argument(model, MEISSONIC.train_timestep(ratio, drawn, torch.bfloat16))
    assert (bf16 % 4096 == 0).all() or (bf16 < 2**19).any()  # bf16's grain above 2^19 is 4096
    assert not torch.equal(bf16, drawn * 1e6)  # the rounding is part of what the release saw


def test_meissonic_sampling_input_is_the_step_index_counting_down():
    """Upstream's scheduler: timesteps = arange(S).flip(0); the pipeline feeds them as longs."""
    steps, masked = 48, torch.ones(2)
    got = [MEISSONIC.sample_timestep(i, steps, masked, torch.float32) for i in range(steps)]
    assert [t[0].item() for t in got] == list(range(steps - 1, -1, -1))
    model = build_model(MODELS["debug"])
    assert torch.equal(sinusoid_argument(model, got[0]), torch.full((2,), 47000.0))
    assert get("meissonic") is MEISSONIC
    with pytest.raises(ValueError, match="unknown convention"):
        get("flux")


def test_pad_after_eot_keeps_the_text_and_its_eot():
    enc = TextEncoder.tiny()
    words = " ".join(["word"] * 100)  # truncated: EOT at position 76, nothing after it
    tokens = enc.tokenizer(["a red fox", "", words])
    padded = pad_after_eot(tokens, EOT_TOKEN_ID)
    for row, eot in ((0, int((tokens[0] == EOT_TOKEN_ID).nonzero()[0])), (1, 1), (2, 76)):
        assert torch.equal(padded[row, : eot + 1], tokens[row, : eot + 1])
        assert (padded[row, eot + 1:] == EOT_TOKEN_ID).all() and (tokens[row, eot + 1:] == 0).all()
    assert padded[1].tolist() == [49406] + [EOT_TOKEN_ID] * 76  # "" as upstream's empty_embeds sees it
    assert torch.equal(pad_after_eot(tokens, 0), tokens)


def test_text_padding_changes_states_after_the_eot_only_and_precision_is_one_for_all_prompts():
    ours, release = TextEncoder.tiny(), TextEncoder.tiny().configure(EOT_TOKEN_ID, autocast=None)
    prompts = ["a lighthouse at dusk", ""]
    (h0, p0), (h1, p1) = ours.encode(prompts), release.encode(prompts)
    assert torch.equal(p0, p1)  # pooled at the first EOT either way
    eot = int((ours.tokenize(prompts[:1])[0] == EOT_TOKEN_ID).nonzero()[0])
    assert torch.equal(h0[0, : eot + 1], h1[0, : eot + 1]) and not torch.allclose(h0[0, eot + 1:], h1[0, eot + 1:])
    bf16 = TextEncoder.tiny().configure(0, autocast=torch.bfloat16)
    hb, pb = bf16.encode(prompts)
    assert hb.dtype == torch.float32 and not torch.equal(hb, h0) and torch.allclose(hb, h0, atol=0.1)
    # The empty prompt is encoded with the same settings (batch 1 vs 2 may move the last bits).
    empty = bf16.empty()
    assert torch.allclose(empty[0][0], hb[1], atol=1e-2) and torch.allclose(empty[1][0], pb[1], atol=1e-2)
    assert not torch.allclose(empty[0][0], ours.empty()[0][0], atol=1e-4)  # bf16, not fp32
    assert torch.allclose(ours.empty()[0][0], h0[1], rtol=1e-5, atol=1e-5)  # fp32, up to kernel rounding
