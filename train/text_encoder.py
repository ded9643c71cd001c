"""Frozen open_clip text tower: penultimate hidden states + pooled projection, as Meissonic uses.

Meissonic conditions on CLIP ViT-H/14's text encoder: the hidden states of the penultimate layer
(no final LayerNorm; HF's ``hidden_states[-2]``), (B, 77, 1024), and the projected end-of-text
feature (HF's ``text_embeds``), (B, 1024). Only the text tower is built and kept in memory.
Weights always come from a local file (no hub); tests and the ``debug`` stage use ``tiny()``.
"""
from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.model import _build_text_tower
from torch import nn

from core.config import ConfigError

TINY_NAME = "tessera-tiny-text"
# Tiny same-architecture config: real CLIP BPE vocabulary and 77 tokens, 64 wide, 3 layers.
# vision_cfg is only there because open_clip's registry requires one; it is never built.
TINY_CONFIG = {"embed_dim": 64,
               "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3}}
# Looked for in a folder: open_clip's names, then Hugging Face's (e.g. Meissonic's text_encoder/).
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                    "model.safetensors", "pytorch_model.bin")
# Hugging Face CLIPTextModel(WithProjection) names -> open_clip TextTransformer names, per layer.
HF_LAYER_NAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}


def register_tiny_config() -> str:
    """Register the tiny config with open_clip (idempotent) and return its name."""
    if open_clip.get_model_config(TINY_NAME) is None:
        folder = Path(tempfile.mkdtemp(prefix="tessera-openclip-"))
        (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(folder / f"{TINY_NAME}.json")
    return TINY_NAME


def build_text_tower(model_name: str) -> nn.Module:
    """An open_clip TextTransformer for a registered model config (random init)."""
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; known: ViT-H-14, ViT-L-14, ... "
                         f"(see open_clip.list_models())")
    if cfg["text_cfg"].get("hf_model_name"):
        raise ValueError(f"{model_name} uses a Hugging Face text tower; only open_clip's own "
                         f"TextTransformer (e.g. ViT-H-14) is supported")
    return _build_text_tower(cfg["embed_dim"], cfg["text_cfg"], quick_gelu=cfg.get("quick_gelu", False))


def hf_to_open_clip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face CLIP text checkpoint (``text_model.*``, ``text_projection.weight``) to
    open_clip's TextTransformer names: q/k/v stack into ``in_proj``, the projection is transposed."""
    out = {"token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": hf["text_model.final_layer_norm.weight"],
           "ln_final.bias": hf["text_model.final_layer_norm.bias"]}
    if "text_projection.weight" in hf:
        out["text_projection"] = hf["text_projection.weight"].t().contiguous()  # (P, D) -> (D, P)
    layers = {int(k.split(".")[3]) for k in hf if k.startswith("text_model.encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([hf[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for hf_name, oc_name in HF_LAYER_NAMES.items():
                out[f"{dst}{oc_name}.{kind}"] = hf[f"{src}{hf_name}.{kind}"]
    return out


def text_state_dict(full: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """The text-tower tensors of a whole-CLIP checkpoint, named as in a bare TextTransformer.

    Plain CLIP checkpoints keep the text tower at the top level (``token_embedding.weight``,
    ``transformer.*``, ...), CustomTextCLIP ones under ``text.``; Hugging Face ones under
    ``text_model.`` (renamed by ``hf_to_open_clip``); the visual tower is dropped.
    """
    if "text_model.embeddings.token_embedding.weight" in full:
        full = hf_to_open_clip(full)
    if any(k.startswith("text.") for k in full):
        full = {k[len("text."):]: v for k, v in full.items() if k.startswith("text.")}
    picked = {k: v for k, v in full.items() if k in wanted}
    missing = sorted(wanted - picked.keys())
    if missing:
        raise ValueError(f"checkpoint lacks text-tower tensors {missing[:4]} (of {len(missing)}): "
                         f"is it an open_clip checkpoint of this model_name?")
    return picked


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a folder holding one of CHECKPOINT_NAMES."""
    path = Path(path)
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no {' or '.join(CHECKPOINT_NAMES)} in {path}")
    if not path.is_file():
        raise FileNotFoundError(f"text encoder checkpoint {path} does not exist (give a local open_clip "
                                f"checkpoint file, e.g. ViT-H-14 laion2b_s32b_b79k open_clip_pytorch_model.bin)")
    return path


class TextEncoder(nn.Module):
    """Frozen text tower; ``encode(prompts)`` -> (hidden (B, 77, D), pooled (B, P)), float32."""

    def __init__(self, tower: nn.Module, model_name: str) -> None:
        super().__init__()
        self.model_name = model_name
        self.tower = tower.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self._empty: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, model_name: str = "ViT-H-14",
                        device: torch.device | str = "cpu") -> "TextEncoder":
        """Load the text tower of a local checkpoint (.bin/.pt/.safetensors, or a folder): open_clip's
        whole-CLIP format, or Hugging Face's CLIPTextModel(WithProjection) of the same architecture."""
        tower = build_text_tower(model_name)
        file = resolve_checkpoint(path)
        try:  # open_clip loads with weights_only=True: a pickle building arbitrary objects is refused
            raw = load_state_dict(str(file))
        except pickle.UnpicklingError as exc:
            raise ConfigError(f"{file}: refused, not a plain state dict (a pickled object could run code): "
                              f"{str(exc).splitlines()[0]}") from exc
        state = text_state_dict(raw, set(tower.state_dict()))
        tower.load_state_dict(state, strict=True)
        return cls(tower, model_name).to(device)

    @classmethod
    def tiny(cls, seed: int = 0) -> "TextEncoder":
        """The tiny registered config with weights drawn from ``seed``: identical on every call,
        without touching the caller's random state (a resumed run rebuilds the same encoder)."""
        name = register_tiny_config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tower = build_text_tower(name)
        return cls(tower, name)

    @property
    def hidden_dim(self) -> int:
        return self.tower.token_embedding.weight.shape[1]

    @property
    def pooled_dim(self) -> int:
        proj = self.tower.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    @property
    def context_length(self) -> int:
        return self.tower.positional_embedding.shape[0]

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate-layer hidden states (B, 77, D) and pooled projection (B, P) for each prompt."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("encode takes a non-empty list of prompts")
        device = self.tower.token_embedding.weight.device
        tokens = self.tokenizer(list(prompts)).to(device)  # (B, 77) ids, truncated/padded
        penultimate = len(self.tower.transformer.resblocks) - 2
        out = self.tower.forward_intermediates(tokens, indices=[penultimate], output_fmt="NLC")
        return out["text_intermediates"][0].float(), out["text_features"].float()

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached encoding of the empty prompt, (1, 77, D) and (1, P): the unconditional input."""
        device = self.tower.token_embedding.weight.device
        if device not in self._empty:
            self._empty[device] = self.encode([""])
        return self._empty[device]
