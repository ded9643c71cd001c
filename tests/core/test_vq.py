"""core.vq: the tokenizer folder format, load errors, encode/decode against diffusers directly."""
from __future__ import annotations

import json

import pytest
import torch

from core import vq as V


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vq") / "vqvae"
    V.save_vq(V.build_vq(V.tiny_vq_config(codebook=64, downsample=4), seed=1), path)
    return path


def test_save_load_roundtrip_is_the_same_model(vq_dir):
    vq = V.load_vq(vq_dir)
    assert not vq.training and not any(p.requires_grad for p in vq.parameters())
    ref = V.build_vq(V.tiny_vq_config(codebook=64, downsample=4), seed=1)
    for (k, a), b in zip(vq.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k


def test_vq_info(vq_dir):
    info = V.vq_info(vq_dir)
    assert info.codebook_size == 64 and info.downsample == 4
    assert len(info.sha256) == 64
    assert info.sha256 == V.vq_info(vq_dir).sha256  # the identity is stable


def test_encode_matches_diffusers_and_decode_shape(vq_dir):
    vq = V.load_vq(vq_dir)
    x = torch.rand(3, 3, 32, 48)
    codes = V.encode_codes(vq, x)
    assert codes.shape == (3, 8, 12) and codes.dtype == torch.long
    direct = vq.quantize(vq.encode(x).latents)[2][2].reshape(3, 8, 12)
    assert torch.equal(codes, direct)
    out = V.decode_codes(vq, codes)
    assert out.shape == (3, 3, 32, 48) and 0 <= out.min() and out.max() <= 1


def test_decode_is_amused_codebook_lookup(vq_dir):
    vq = V.load_vq(vq_dir)
    codes = torch.randint(0, 64, (2, 4, 4))
    # Same as quantizing latents that already sit on the codebook entries.
    z = vq.quantize.embedding.weight[codes].permute(0, 3, 1, 2)  # (B, C, h, w)
    expect = vq.decode(z).sample.clamp(0, 1)
    assert torch.allclose(V.decode_codes(vq, codes), expect, atol=1e-5)


@pytest.mark.parametrize("res,grid", [(256, 16), (512, 32), (1024, 64)])
def test_grid_arithmetic_f16(res, grid):
    # block_out_channels of the released aMUSEd/Meissonic VQ (shared/reference/vq_config.json)
    assert V.downsample_factor({"block_out_channels": [128, 256, 256, 512, 768]}) == 16
    assert V.grid_shape(res, res, 16) == (grid, grid)


def test_grid_rejects_non_multiple():
    with pytest.raises(V.VQError, match="multiple of the tokenizer's downsampling factor 16"):
        V.grid_shape(500, 500, 16)


def test_tiny_config_downsample():
    for ds in (1, 2, 4, 8, 16):
        assert V.downsample_factor(V.tiny_vq_config(downsample=ds)) == ds
    with pytest.raises(ValueError):
        V.tiny_vq_config(downsample=6)


def test_missing_folder_config_weights(tmp_path, vq_dir):
    with pytest.raises(V.VQError, match="VQ folder not found"):
        V.load_vq(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(V.VQError, match="config.json: missing"):
        V.load_vq(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text((vq_dir / "config.json").read_text())
    with pytest.raises(V.VQError, match="diffusion_pytorch_model.safetensors: missing"):
        V.load_vq(tmp_path / "a")


def test_wrong_config_names_the_file(tmp_path, vq_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "diffusion_pytorch_model.safetensors").write_bytes((vq_dir / "diffusion_pytorch_model.safetensors").read_bytes())
    (bad / "config.json").write_text("{not json")
    with pytest.raises(V.VQError, match=r"config.json: not valid JSON"):
        V.load_vq(bad)
    (bad / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(V.VQError, match=r"config.json: _class_name is 'UNet2DModel'"):
        V.load_vq(bad)
    (bad / "config.json").write_text(json.dumps({"_class_name": "VQModel", "latent_channels": 4}))
    with pytest.raises(V.VQError, match=r"config.json: not a VQModel config, missing block_out_channels"):
        V.load_vq(bad)
    # A valid config whose architecture does not fit the weights (codebook 128 vs 64).
    (bad / "config.json").write_text(json.dumps(V.tiny_vq_config(codebook=128, downsample=4)))
    with pytest.raises(V.VQError, match=r"safetensors: weights do not fit config.json: \d+ of the wrong shape"):
        V.load_vq(bad)
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(V.VQError, match=r"safetensors: unreadable"):
        V.load_vq(bad)


def test_autocast_encoder_keeps_shape(vq_dir):
    vq = V.load_vq(vq_dir)
    codes = V.encode_codes(vq, torch.rand(2, 3, 16, 16), autocast_dtype=torch.bfloat16)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long and int(codes.max()) < 64
