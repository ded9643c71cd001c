"""The Meissonic transformer: checkpoint-exact names, behaviour at init, conditioning, numerics."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import train.model as model_mod
from train.model import (MODELS, ModelConfig, build_model, compression_keys, count_params,
                         load_without_compression)
from train.rope import apply_rope, rope_cos_sin, rope_ids
from released import RELEASED_PARAMS, released_shapes  # tests/train/, on the path by conftest


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def meta_shapes(cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], int]:
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, count_params(model)


def inputs(cfg: ModelConfig, b: int = 2, h: int = 4, w: int = 4, t: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.vocab_size, (b, h, w), generator=g)
    return (codes, torch.randn(b, t, cfg.text_dim, generator=g), torch.randn(b, cfg.pooled_dim, generator=g),
            torch.rand(b, cfg.micro_cond_dim, generator=g) * 512, torch.rand(b, generator=g))


def randomize_adaln(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised modulation layers weights, so blocks are no longer identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, model_mod.AdaLNZero):
                m.linear.weight.copy_(torch.randn(m.linear.weight.shape, generator=g) * 0.1)
                m.linear.bias.copy_(torch.randn(m.linear.bias.shape, generator=g) * 0.1)


def test_meissonic_1b_1024_state_dict_is_the_released_one():
    ref = released_shapes()
    shapes, n = meta_shapes(MODELS["meissonic-1b-1024"])
    assert shapes == ref  # same names and shapes: strict=True loading works
    assert n == RELEASED_PARAMS == sum(torch.Size(s).numel() for s in ref.values())


def test_without_compression_is_released_minus_down_up_layers():
    ref = released_shapes()
    shapes, _ = meta_shapes(MODELS["meissonic-1b"])
    expected = {k: v for k, v in ref.items() if not k.startswith(("down_block.", "up_block."))}
    assert shapes == expected
    assert len(ref) - len(expected) == 4


def test_stage3_transition_loads_stage2_weights_and_keeps_compression_init():
    small = build_model(MODELS["debug"])
    big = build_model(dataclasses.replace(MODELS["debug"], downsample=True))
    left = load_without_compression(big, small.state_dict())
    assert sorted(left) == sorted(compression_keys(big)) and len(left) == 4
    for k, v in small.state_dict().items():
        assert torch.equal(big.state_dict()[k], v)
    wrong = build_model(MODELS["debug"].with_codebook(32)).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_without_compression(big, wrong)
    with pytest.raises(ValueError, match="missing"):
        load_without_compression(big, {k: v for k, v in small.state_dict().items() if "mlm_layer" not in k})


def test_blocks_are_identity_at_init():
    cfg = MODELS["debug"]
    model = build_model(cfg)
    x, ctx = torch.randn(2, 16, cfg.hidden), torch.randn(2, 5, cfg.hidden)
    temb = torch.randn(2, cfg.hidden)
    cos, sin = rope_cos_sin(torch.cat([rope_ids(4, 4, 5)[1], rope_ids(4, 4, 5)[0]]), cfg.rope_axes)
    x2, ctx2 = model.transformer_blocks[0](x, ctx, temb, cos, sin)
    assert torch.equal(x2, x) and torch.equal(ctx2, ctx)
    joint = torch.cat([ctx, x], 1)
    assert torch.equal(model.single_transformer_blocks[0](joint, temb, cos, sin), joint)
    randomize_adaln(model)
    x3, _ = model.transformer_blocks[0](x, ctx, temb, cos, sin)
    assert not torch.allclose(x3, x)


def test_forward_shape_and_mask_token():
    cfg = MODELS["debug"]
    assert cfg.mask_token_id == cfg.vocab_size - 1 == 64
    big = MODELS["meissonic-1b"]
    assert (big.codebook_size, big.vocab_size, big.mask_token_id) == (8192, 8256, 8255)
    logits = build_model(cfg)(*inputs(cfg, h=4, w=6))
    assert logits.shape == (2, 24, cfg.codebook_size)


def test_logits_are_row_major_positions():
    # with identity blocks a position's logits depend only on its own code: move one code, see it move
    cfg = MODELS["debug"]
    model = build_model(cfg).eval()
    codes, text, pooled, micro, t = inputs(cfg, b=1, h=3, w=5)
    codes[:] = 0
    codes[0, 1, 3] = 7  # row 1, col 3 -> flat index 8
    logits = model(codes, text, pooled, micro, t)[0]
    differs = [i for i in range(15) if not torch.allclose(logits[i], logits[0])]
    assert differs == [1 * 5 + 3]


def test_with_codebook_keeps_spare_ids():
    assert MODELS["debug"].with_codebook(100).vocab_size == 101
    big = MODELS["meissonic-1b"].with_codebook(16384)
    assert (big.codebook_size, big.vocab_size) == (16384, 16448)


@pytest.mark.parametrize("change, msg", [({"hidden": 80}, "heads \\* head_dim"),
                                         ({"vocab_size": 64}, "mask id"),
                                         ({"rope_axes": (8, 12, 10)}, "rope_axes"),
                                         ({"dual_blocks": 0, "single_blocks": 0}, "at least one block"),
                                         ({"codebook_size": 0}, "codebook_size")])
def test_config_validation(change, msg):
    with pytest.raises(ValueError, match=msg):
        dataclasses.replace(MODELS["debug"], **change)


def test_bad_input_shapes_name_the_input():
    cfg = MODELS["debug"]
    model = build_model(cfg)
    codes, text, pooled, micro, t = inputs(cfg)
    with pytest.raises(ValueError, match="pooled"):
        model(codes, text, pooled[:, :3], micro, t)
    with pytest.raises(ValueError, match="micro_conds"):
        model(codes, text, pooled, micro[:, :4], t)
    odd = build_model(dataclasses.replace(cfg, downsample=True))
    with pytest.raises(ValueError, match="even code grid"):
        odd(codes[:, :3], text, pooled, micro, t)


def test_rope_positions_come_from_the_compressed_grid(monkeypatch):
    assert MODELS["meissonic-1b-1024"].token_grid(64, 64) == (32, 32)  # 1024 px, f16 VQ -> 64x64 codes
    assert MODELS["meissonic-1b"].token_grid(32, 32) == (32, 32)  # 512 px, no compression
    img_ids, txt_ids = rope_ids(32, 32, 77)
    assert img_ids.shape == (1024, 3) and txt_ids.shape == (77, 3) and not txt_ids.any()
    assert img_ids[:, 1].max() == 31 and img_ids[:, 2].max() == 31 and not img_ids[:, 0].any()
    assert img_ids[33].tolist() == [0.0, 1.0, 1.0]  # row-major: index 33 = row 1, col 1
    seen = []
    monkeypatch.setattr(model_mod, "rope_ids", lambda h, w, t, d: seen.append((h, w, t)) or rope_ids(h, w, t, d))
    cfg = dataclasses.replace(MODELS["debug"], downsample=True)
    logits = build_model(cfg)(*inputs(cfg, h=8, w=12, t=5))
    assert seen == [(4, 6, 5)] and logits.shape == (2, 96, cfg.codebook_size)


def test_rope_rotates_pairs_and_keeps_norms():
    x = torch.randn(1, 1, 3, 4)
    ids = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    cos, sin = rope_cos_sin(ids, (2, 2))
    out = apply_rope(x, cos, sin)
    assert torch.allclose(out[..., :2], x[..., :2])  # axis 0 ids are all 0: no rotation
    a, b = x[0, 0, 1, 2], x[0, 0, 1, 3]  # axis 1 at position 1 rotates by 1 radian
    c, s = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    assert torch.allclose(out[0, 0, 1, 2:], torch.stack([a * c - b * s, b * c + a * s]), atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-6)


def test_outputs_depend_on_every_condition_after_training_steps():
    torch.manual_seed(0)
    cfg = MODELS["debug"]
    model = build_model(cfg)
    codes, text, pooled, micro, t = inputs(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(codes, text, pooled, micro, t).flatten(0, 1),
                                                 codes.flatten().clamp(max=cfg.codebook_size - 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        base = model(codes, text, pooled, micro, t)
        variants = {"text": model(codes, text.roll(1, 0), pooled, micro, t),
                    "pooled": model(codes, text, pooled.roll(1, 0), micro, t),
                    "micro": model(codes, text, pooled, micro + 64, t),
                    "timestep": model(codes, text, pooled, micro, 1 - t)}
    for name, out in variants.items():
        assert (out - base).abs().max() > 1e-4, name


def test_gradient_checkpointing_gives_identical_gradients():
    cfg = dataclasses.replace(MODELS["debug"], dual_blocks=2, single_blocks=2)
    model = build_model(cfg)
    randomize_adaln(model)
    batch = inputs(cfg)

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(*batch).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads()
    model.gradient_checkpointing = True
    ckpt = grads()
    assert all(torch.allclose(plain[n], ckpt[n], rtol=1e-5, atol=1e-7) for n in plain)


def test_bf16_autocast_runs_on_cpu():
    cfg = MODELS["debug"]
    model = build_model(cfg)
    randomize_adaln(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(*inputs(cfg))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_numerics_match_diffusers_flux_reference_blocks():
    """Our blocks, RoPE, sinusoids and 2x2 layers compute what the checkpoint's diffusers modules compute."""
    flux = pytest.importorskip("diffusers.models.transformers.transformer_flux")
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.embeddings import get_timestep_embedding
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    cfg = MODELS["debug"]
    model = build_model(cfg)
    randomize_adaln(model)
    x, ctx, temb = torch.randn(2, 12, cfg.hidden), torch.randn(2, 5, cfg.hidden), torch.randn(2, cfg.hidden)
    img_ids, txt_ids = rope_ids(3, 4, 5)
    ids = torch.cat([txt_ids, img_ids])
    ref_rope = flux.FluxPosEmbed(theta=10000, axes_dim=list(cfg.rope_axes))(ids)
    cos, sin = rope_cos_sin(ids, cfg.rope_axes)
    assert torch.allclose(cos, ref_rope[0]) and torch.allclose(sin, ref_rope[1])

    ref_dual = flux.FluxTransformerBlock(cfg.hidden, cfg.heads, cfg.head_dim)
    ref_dual.load_state_dict(model.transformer_blocks[0].state_dict(), strict=True)
    ref_ctx, ref_x = ref_dual(x, ctx, temb, ref_rope)
    ours_x, ours_ctx = model.transformer_blocks[0](x, ctx, temb, cos, sin)
    assert torch.allclose(ours_x, ref_x, atol=1e-5) and torch.allclose(ours_ctx, ref_ctx, atol=1e-5)

    ref_single = flux.FluxSingleTransformerBlock(cfg.hidden, cfg.heads, cfg.head_dim)
    ref_single.load_state_dict(model.single_transformer_blocks[0].state_dict(), strict=True)
    ref_ctx, ref_x = ref_single(x, ctx, temb, ref_rope)
    ours = model.single_transformer_blocks[0](torch.cat([ctx, x], 1), temb, cos, sin)
    assert torch.allclose(ours, torch.cat([ref_ctx, ref_x], 1), atol=1e-5)

    values = torch.tensor([0.0, 3.0, 512.0, 1000.0])
    assert torch.allclose(model_mod.sinusoidal_embedding(values, 256),
                          get_timestep_embedding(values, 256, flip_sin_to_cos=True, downscale_freq_shift=0),
                          atol=1e-5)

    comp = build_model(dataclasses.replace(cfg, downsample=True))
    kw = dict(norm_type="rms_norm", eps=cfg.eps, elementwise_affine=True, bias=False)
    down = Downsample2D(cfg.hidden, use_conv=True, padding=0, name="Conv2d_0", kernel_size=2, **kw)
    up = Upsample2D(cfg.hidden, use_conv_transpose=True, kernel_size=2, padding=0, name="conv",
                    interpolate=False, **kw)
    down.load_state_dict(comp.down_block.downsample.state_dict(), strict=True)
    up.load_state_dict(comp.up_block.upsample.state_dict(), strict=True)
    grid = torch.randn(2, cfg.hidden, 4, 6)  # channels-first for diffusers
    ours_down = comp.down_block.downsample(grid.permute(0, 2, 3, 1))
    assert torch.allclose(ours_down.permute(0, 3, 1, 2), down(grid), atol=1e-5)
    assert torch.allclose(comp.up_block.upsample(ours_down).permute(0, 3, 1, 2),
                          up(down(grid)), atol=1e-5)


def test_compiles_as_one_graph():
    """No graph breaks: torch.compile sees the whole model. Checked with activation checkpointing
    on, where dynamo must also trace every block body as a checkpoint region without a break."""
    cfg = MODELS["debug"]
    model = build_model(cfg)
    model.gradient_checkpointing = True
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*inputs(cfg))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_blocks_are_numerically_identical_and_compiled_once_per_class():
    """compile_blocks (the trainer's torch.compile): with the aot_eager backend (the graphs Inductor
    would get, no code generation) outputs equal eager bit for bit, also under activation
    checkpointing, and gradients to fp32 rounding (the conditioning vector's gradient is summed
    over the blocks in another order: ~1e-9 apart); one graph per block class; names unchanged."""
    from torch._dynamo.utils import counters

    from train.model import compile_blocks

    cfg = dataclasses.replace(MODELS["debug"], dual_blocks=3, single_blocks=3)
    torch.manual_seed(0)
    eager = build_model(cfg)
    randomize_adaln(eager)
    compiled = build_model(cfg)
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(compiled, backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    batch = inputs(cfg)
    for ckpt in (False, True):
        eager.gradient_checkpointing = compiled.gradient_checkpointing = ckpt
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            out = model(*batch)
            out.square().mean().backward()
            outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert torch.equal(outs[0][0], outs[1][0]), ckpt
        assert all(torch.allclose(outs[0][1][n], outs[1][1][n], rtol=1e-5, atol=1e-8) for n in outs[0][1]), ckpt
    assert counters["stats"]["unique_graphs"] <= 2 * 4  # dual, single, embed, head; x2 with checkpointing


def test_attention_kernel_report_on_cpu():
    from train.kernels import attention_ops, sdpa_choice

    cfg = MODELS["debug"]
    assert sdpa_choice(cfg, (4, 4), 2, torch.device("cpu"), torch.float32) == "FLASH_ATTENTION"  # CPU flash
    model = build_model(cfg)
    ops = attention_ops(lambda: model(*inputs(cfg)).sum().backward(), torch.device("cpu"))
    assert ops == ["aten::_scaled_dot_product_flash_attention_for_cpu",
                   "aten::_scaled_dot_product_flash_attention_for_cpu_backward"]
