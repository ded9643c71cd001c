"""The released Meissonic weights (a diffusers-style folder) in this project's classes.

    RELEASE/transformer/config.json                    Transformer2DModel config (upstream src/transformer.py)
    RELEASE/transformer/diffusion_pytorch_model.safetensors   (or shards + ....safetensors.index.json)
    RELEASE/text_encoder/config.json + model.safetensors      Hugging Face CLIPTextModelWithProjection
    RELEASE/tokenizer/special_tokens_map.json, tokenizer_config.json, vocab.json   CLIPTokenizer
    RELEASE/vqvae/config.json + diffusion_pytorch_model.safetensors               (core.vq format)

`load_release` gives what `train sample` needs, with the release's own conventions: its timestep
inputs and text padding (`train/convention.py` "meissonic", the pad id read from its tokenizer
folder), text encoded in fp32 and micro-conditions [1024, 1024, 0, 0, 6] as upstream's
`inference.py` / pipeline do. `transformer_weights` feeds `init_from` (fine-tuning the release).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from core.errors import UserError

from train.convention import CONVENTIONS
from train.model import MeissonicTransformer, ModelConfig, build_model
from train.sampler import square_micro_conds
from train.text_encoder import TextEncoder, register_hf_text_config

TRANSFORMER = "transformer"
WEIGHTS = "diffusion_pytorch_model.safetensors"
DEFAULT_PAD_TOKEN = "<|endoftext|>"  # transformers' CLIPTokenizer default (`pad_token="<|endoftext|>"`)
RESOLUTION = 1024  # upstream pipeline's default size; its RoPE ids assume the 2x2 compression there
VQ_FACTOR = 16  # the release's VQ-GAN is f16


class ReleaseError(UserError):
    """A folder that is not a usable Meissonic release (missing files, another architecture)."""


def is_release(path: str | Path) -> bool:
    return (Path(path) / TRANSFORMER / "config.json").is_file()


def model_config(cfg: dict[str, Any]) -> ModelConfig:
    """ModelConfig from the release's transformer/config.json (upstream Transformer2DModel's keys).
    Widths upstream hard-codes (256 per micro-condition and for the timestep sinusoid, MLP x4,
    eps 1e-6) are this class's defaults."""
    if cfg.get("guidance_embeds") or cfg.get("patch_size", 1) != 1:
        raise ReleaseError("transformer config: guidance embeddings / patch_size != 1 are not Meissonic's")
    if bool(cfg.get("downsample", False)) != bool(cfg.get("upsample", False)):
        raise ReleaseError("transformer config: downsample and upsample must be both on or both off")
    try:
        return ModelConfig(codebook_size=cfg["codebook_size"], vocab_size=cfg["vocab_size"],
                           hidden=cfg["num_attention_heads"] * cfg["attention_head_dim"],
                           heads=cfg["num_attention_heads"], head_dim=cfg["attention_head_dim"],
                           dual_blocks=cfg["num_layers"], single_blocks=cfg["num_single_layers"],
                           text_dim=cfg["joint_attention_dim"], pooled_dim=cfg["pooled_projection_dim"],
                           rope_axes=tuple(cfg["axes_dims_rope"]), downsample=bool(cfg.get("downsample")))
    except KeyError as exc:
        raise ReleaseError(f"transformer/config.json lacks {exc}") from None


def transformer_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The release transformer's state dict (one safetensors file, or the shards of an index)."""
    sub = Path(folder) / TRANSFORMER
    index = sub / f"{WEIGHTS}.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for name in files:
            weights.update(load_file(str(sub / name)))
        return weights
    if not (sub / WEIGHTS).is_file():
        raise ReleaseError(f"{sub}: no {WEIGHTS} (or its .index.json)")
    return load_file(str(sub / WEIGHTS))


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32) -> MeissonicTransformer:
    """The release transformer, built without initialising 1B parameters (meta device) and
    loaded with strict=True (every name and shape must match)."""
    cfg = model_config(json.loads((Path(folder) / TRANSFORMER / "config.json").read_text()))
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(transformer_weights(folder), strict=True, assign=True)
    return model.to(dtype)


def pad_token_id(folder: str | Path) -> int:
    """The id the release's tokenizer pads with: its special_tokens_map.json / tokenizer_config.json
    pad_token (transformers' CLIPTokenizer default <|endoftext|> when neither names one), looked up
    in its vocab.json, else in the CLIP vocabulary open_clip ships (the same ids)."""
    tok = Path(folder) / "tokenizer"
    token = DEFAULT_PAD_TOKEN
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (tok / name).is_file():
            found = json.loads((tok / name).read_text()).get("pad_token")
            if found:
                token = found["content"] if isinstance(found, dict) else found
                break
    if (tok / "vocab.json").is_file():
        vocab = json.loads((tok / "vocab.json").read_text())
    else:
        import open_clip

        tokenizer = open_clip.get_tokenizer("ViT-H-14")  # names its special tokens differently
        vocab = dict(tokenizer.encoder, **{"<|startoftext|>": tokenizer.sot_token_id,
                                           "<|endoftext|>": tokenizer.eot_token_id})
    if token not in vocab:
        raise ReleaseError(f"{tok}: pad token {token!r} is not in the CLIP vocabulary")
    return int(vocab[token])


def load_text_encoder(folder: str | Path, device: torch.device | str = "cpu") -> TextEncoder:
    """The release's text_encoder/ (HF CLIPTextModelWithProjection) as an open_clip tower built from
    its own config.json, padding as its tokenizer does, in fp32 (upstream's inference)."""
    sub = Path(folder) / "text_encoder"
    if not (sub / "config.json").is_file():
        raise ReleaseError(f"{sub}: no config.json (a Hugging Face CLIPTextModelWithProjection folder)")
    name = register_hf_text_config(json.loads((sub / "config.json").read_text()))
    encoder = TextEncoder.from_checkpoint(sub, model_name=name, device=device)
    return encoder.configure(pad_token_id(folder), autocast=None)


def load_release(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 ) -> tuple[MeissonicTransformer, TextEncoder, dict[str, Any]]:
    """(model, text encoder, meta) of a release folder, with the release's sampling conventions.
    dtype: the weights' dtype, also the model's compute precision (fp32 as upstream's inference.py;
    bf16 halves memory and time)."""
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    folder = Path(folder)
    model = load_model(folder, dtype).to(device).eval()
    encoder = load_text_encoder(folder, device)
    resolution = RESOLUTION if model.cfg.downsample else RESOLUTION // 2
    side = resolution // VQ_FACTOR
    meta = {"checkpoint": str(folder), "release": True, "convention": CONVENTIONS["meissonic"].name,
            "precision": precision, "resolution": resolution, "grid": [side, side], "vq": str(folder / "vqvae"),
            "sample_micro_conds": square_micro_conds(resolution)}
    return model, encoder, meta
