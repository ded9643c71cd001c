"""The VQ tokenizer: diffusers `VQModel` loaded from a local folder, images <-> code grids.

The folder format is the released checkpoints' (`MeissonFlow/Meissonic/vqvae`,
`amused/amused-512/vqvae`): `config.json` + `diffusion_pytorch_model.safetensors`, which is
also what `save_vq` (diffusers `save_pretrained`) writes. The model takes pixels in [0, 1]
with no normalisation (aMUSEd's and Meissonic's training scripts feed `ToTensor()` output)
and its decoder returns [0, 1] images after clamping.

Codes are the quantizer's nearest-codebook indices, as aMUSEd's trainer takes them:
    vq.quantize(vq.encode(x).latents)[2][2]        # (B*h*w,) flattened, row-major per image
and decoding is aMUSEd's pipeline path:
    vq.decode(indices, force_not_quantize=True, shape=(B, h, w, C))   # codebook lookup, decode
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.codeshard import TokenizerInfo, file_sha256
from core.errors import UserError

if TYPE_CHECKING:  # torch is imported where a model is built or run: the drivers that only
    import torch  # read a VQ folder's identity (`pretokenize`'s) start ~2 s sooner without it

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

# Keys a VQModel config must have to be the aMUSEd/Meissonic architecture family.
_REQUIRED_KEYS = ("block_out_channels", "num_vq_embeddings", "latent_channels", "down_block_types")


class VQError(UserError):
    """A VQ folder that is missing, incomplete or not a diffusers VQModel; names the file."""


def read_vq_config(path: str | os.PathLike) -> dict[str, Any]:
    """The folder's `config.json`, checked to describe a diffusers VQModel."""
    folder = Path(path)
    if not folder.is_dir():
        raise VQError(f"{folder}: VQ folder not found (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise VQError(f"{cfg_path}: missing; a VQ folder holds {CONFIG_FILE} + {WEIGHTS_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise VQError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise VQError(f"{cfg_path}: expected a JSON object")
    cls = cfg.get("_class_name", "VQModel")
    if cls != "VQModel":
        raise VQError(f"{cfg_path}: _class_name is {cls!r}, expected 'VQModel' (the vqvae subfolder?)")
    missing = [k for k in _REQUIRED_KEYS if k not in cfg]
    if missing:
        raise VQError(f"{cfg_path}: not a VQModel config, missing {', '.join(missing)}")
    return cfg


def downsample_factor(cfg: dict[str, Any]) -> int:
    """Pixels per token side: every encoder block but the last halves the resolution."""
    return 2 ** (len(cfg["block_out_channels"]) - 1)


def _weights_path(path: str | os.PathLike) -> Path:
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise VQError(f"{weights}: missing; a VQ folder holds {CONFIG_FILE} + {WEIGHTS_FILE}")
    return weights


def load_vq(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a diffusers VQModel from a local folder; eval mode, gradients off.

    Every problem raises VQError naming the file (missing folder/config/weights, a config
    that is not a VQModel, weights whose names or shapes do not fit the config)."""
    from diffusers import VQModel
    from safetensors.torch import load_file

    cfg = read_vq_config(path)
    weights = _weights_path(path)
    try:
        model = VQModel.from_config(cfg)
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise VQError(f"{Path(path) / CONFIG_FILE}: cannot build a VQModel ({exc})") from exc
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise VQError(f"{weights}: unreadable safetensors file ({exc})") from exc
    _load_state(model, state, weights)
    model.to(device).eval().requires_grad_(False)
    return model


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], weights: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{len(keys)} {label} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong))
            if keys
        )
        raise VQError(f"{weights}: weights do not fit {CONFIG_FILE}: {detail}")
    model.load_state_dict(state, strict=True)


def vq_info(path: str | os.PathLike) -> TokenizerInfo:
    """Identity of a VQ folder: weights sha256 (the identity), codebook size, downsampling."""
    cfg = read_vq_config(path)
    weights = _weights_path(path)
    return TokenizerInfo(
        sha256=file_sha256(weights),
        path=str(Path(path).resolve()),
        codebook_size=int(cfg["num_vq_embeddings"]),
        downsample=downsample_factor(cfg),
    )


def model_downsample(vq) -> int:
    return downsample_factor(dict(vq.config))


def grid_shape(res_h: int, res_w: int, downsample: int) -> tuple[int, int]:
    """Token grid (h, w) for an image of res_h x res_w pixels; both must divide evenly."""
    if res_h % downsample or res_w % downsample or res_h <= 0 or res_w <= 0:
        raise VQError(
            f"resolution {res_h}x{res_w} is not a positive multiple of the tokenizer's "
            f"downsampling factor {downsample}; use e.g. {max(1, res_h // downsample) * downsample}"
        )
    return res_h // downsample, res_w // downsample


def encode_codes(vq, pixels: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, 3, H, W) pixels in [0, 1] -> (B, h, w) int64 code indices.

    `autocast_dtype` (e.g. torch.bfloat16) runs the conv encoder under autocast; the
    nearest-codebook search always runs in fp32 so near ties are not decided by rounding."""
    import torch

    ds = model_downsample(vq)
    h, w = grid_shape(pixels.shape[-2], pixels.shape[-1], ds)
    param = next(vq.parameters())
    x = pixels.to(param.device, dtype=param.dtype)
    with torch.no_grad():
        if autocast_dtype is None:
            latents = vq.encode(x).latents  # (B, C, h, w)
        else:
            with torch.autocast(device_type=param.device.type, dtype=autocast_dtype):
                latents = vq.encode(x).latents
        indices = vq.quantize(latents.to(vq.quantize.embedding.weight.dtype))[2][2]  # (B*h*w,)
    return indices.reshape(pixels.shape[0], h, w)


def decode_codes(vq, codes: torch.Tensor) -> torch.Tensor:
    """(B, h, w) code indices -> (B, 3, h*f, w*f) float pixels in [0, 1] (aMUSEd's decode path)."""
    import torch

    if codes.ndim != 3:
        raise ValueError(f"decode_codes expects (B, h, w) codes, got shape {tuple(codes.shape)}")
    param = next(vq.parameters())
    codes = codes.to(param.device, dtype=torch.long)
    b, h, w = codes.shape
    shape = (b, h, w, vq.quantize.vq_embed_dim)
    with torch.no_grad():
        out = vq.decode(codes, force_not_quantize=True, shape=shape).sample  # (B, 3, H, W)
    return out.float().clamp(0, 1)


def save_vq(vq, path: str | os.PathLike) -> Path:
    """Save in the released folder format (config.json + diffusion_pytorch_model.safetensors)."""
    path = Path(path)
    vq.save_pretrained(str(path), safe_serialization=True)
    return path


def tiny_vq_config(codebook: int = 64, downsample: int = 4, width: int = 16) -> dict[str, Any]:
    """A tiny VQModel config of the same class and block types as the real f16/8192 one
    (`shared/reference/vq_config.json`), for tests and demos. `downsample` is a power of 2."""
    if downsample < 1 or downsample & (downsample - 1):
        raise ValueError(f"downsample must be a power of 2, got {downsample}")
    n_blocks = downsample.bit_length()  # 2**(n_blocks-1) == downsample
    channels = [width * min(2 ** i, 4) for i in range(n_blocks)]
    return {
        "_class_name": "VQModel",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * n_blocks,
        "up_block_types": ["UpDecoderBlock2D"] * n_blocks,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "num_vq_embeddings": codebook,
        "vq_embed_dim": None,
        "mid_block_add_attention": False,
        "lookup_from_codebook": True,
        "force_upcast": True,
        "scaling_factor": 0.18215,
        "sample_size": 32,
        "norm_type": "group",
    }


def build_vq(config: dict[str, Any], seed: int = 0):
    """A randomly initialised VQModel from a config dict (eval mode), e.g. `tiny_vq_config()`."""
    import torch
    from diffusers import VQModel

    torch.manual_seed(seed)
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return VQModel.from_config(cfg).eval()
