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
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.model import _build_text_tower
from torch import nn

from core.config import ConfigError
from train.convention import OPEN_CLIP_PAD_ID, pad_after_eot

# open_clip's tokenizer cleans and BPE-encodes the whole text before it keeps 77 tokens: a 1 MB
# caption cost 4 s a sample, 100 kB 0.6 s. A CLIP token spans at most 32 characters, so 77 of
# them lie within the first 2,464 characters of whitespace-collapsed text; longer prompts are
# collapsed and cut to PROMPT_CHARS first (the same ids, tests/train/test_text_encoder.py).
PROMPT_CHARS = 16_384


def bounded_prompt(text: str) -> str:
    """`text`, or for a text over PROMPT_CHARS its whitespace-collapsed first PROMPT_CHARS characters."""
    return text if len(text) <= PROMPT_CHARS else " ".join(text.split())[:PROMPT_CHARS]


REAL_MODEL_NAME = "ViT-H-14"  # Meissonic's text tower (open_clip config name)
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


@dataclass
class TextConfig:
    checkpoint: str | None = None  # open_clip ViT-H-14 checkpoint (local path); required unless tiny or random,
                                   # which take precedence (a --set cannot clear a key to null)
    tiny: bool = False  # use the tiny seeded text encoder (debug stage: no checkpoint needed)
    tiny_seed: int = 0  # seed of the tiny (or random) text encoder; fixed so a resumed run encodes identically
    random: bool = False  # the real ViT-H-14 text tower with seeded random weights: throughput runs only
                          # (bench/gpu_stages.py), the captions then mean nothing

    def __post_init__(self) -> None:
        if self.tiny and self.random:
            raise ValueError("text.tiny and text.random exclude each other")
        if not (self.tiny or self.random or self.checkpoint):
            raise ValueError(
                "text.checkpoint is required (a local open_clip ViT-H-14 checkpoint); "
                "set it in pipelines.yaml or with --set text.checkpoint=PATH"
            )


def register_tiny_config() -> str:
    """Register the tiny config with open_clip (idempotent) and return its name."""
    if open_clip.get_model_config(TINY_NAME) is None:
        folder = Path(tempfile.mkdtemp(prefix="tessera-openclip-"))
        (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(folder / f"{TINY_NAME}.json")
    return TINY_NAME


def register_hf_text_config(hf: dict) -> str:
    """Register an open_clip config equal to a Hugging Face ``CLIPTextConfig`` (the ``config.json``
    of a ``CLIPTextModelWithProjection`` folder, e.g. a release's ``text_encoder/``) and return its
    name, so the architecture comes from the release rather than from an assumed model name."""
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "projection_dim", "vocab_size", "max_position_embeddings")
    missing = [k for k in keys if k not in hf]
    if missing:
        raise ValueError(f"text encoder config.json lacks {missing}: not a CLIPTextConfig")
    if hf["intermediate_size"] % hf["hidden_size"]:
        raise ValueError("text encoder: intermediate_size must be a multiple of hidden_size")
    name = "tessera-hf-text-" + "-".join(str(hf[k]) for k in keys) + f"-{hf.get('hidden_act', 'gelu')}"
    if open_clip.get_model_config(name) is None:
        text_cfg = {"context_length": hf["max_position_embeddings"], "vocab_size": hf["vocab_size"],
                    "width": hf["hidden_size"], "heads": hf["num_attention_heads"],
                    "layers": hf["num_hidden_layers"], "mlp_ratio": hf["intermediate_size"] // hf["hidden_size"]}
        cfg = {"embed_dim": hf["projection_dim"], "quick_gelu": hf.get("hidden_act") == "quick_gelu",
               "vision_cfg": TINY_CONFIG["vision_cfg"], "text_cfg": text_cfg}
        folder = Path(tempfile.mkdtemp(prefix="tessera-openclip-"))
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
    return name


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
    """Frozen text tower; ``encode(prompts)`` -> (hidden (B, 77, D), pooled (B, P)), float32.

    Two settings belong to the run, not the weights (``configure``): the pad id written after
    <|endoftext|> (open_clip's 0, or the released model's 49407) and the precision the tower runs
    in (None = fp32, else an autocast dtype). Every prompt, the empty one included, is encoded
    with the same settings, in training and in sampling.
    """

    def __init__(self, tower: nn.Module, model_name: str) -> None:
        super().__init__()
        self.model_name = model_name
        self.tower = tower.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.pad_token_id = OPEN_CLIP_PAD_ID
        self.autocast: torch.dtype | None = None
        self._empty: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def configure(self, pad_token_id: int, autocast: torch.dtype | None) -> "TextEncoder":
        """Set the run's text padding and precision (clears the cached empty-prompt encoding)."""
        self.pad_token_id, self.autocast = pad_token_id, autocast
        self._empty.clear()
        return self

    @classmethod
    def from_checkpoint(cls, path: str | Path, model_name: str = REAL_MODEL_NAME,
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
    def from_config(cls, cfg: TextConfig, device: torch.device | str = "cpu") -> "TextEncoder":
        """The encoder a stage's (or a checkpoint's recorded) text settings describe."""
        if cfg.tiny:
            return cls.tiny(cfg.tiny_seed).to(device)
        if cfg.random:
            return cls.seeded(REAL_MODEL_NAME, cfg.tiny_seed).to(device)
        return cls.from_checkpoint(cfg.checkpoint, device=device)

    @classmethod
    def tiny(cls, seed: int = 0) -> "TextEncoder":
        """The tiny registered config with weights drawn from ``seed`` (see ``seeded``)."""
        return cls.seeded(register_tiny_config(), seed)

    @classmethod
    def seeded(cls, model_name: str, seed: int = 0) -> "TextEncoder":
        """Random weights of ``model_name``'s text tower drawn from ``seed``: identical on every
        call, without touching the caller's random state (a resumed run rebuilds the same encoder).
        The real architecture with meaningless weights is for throughput runs (``text.random``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tower = build_text_tower(model_name)
        return cls(tower, model_name)

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

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77) token ids: [SOT] text [EOT], truncated to 77, then this run's pad id."""
        return pad_after_eot(self.tokenizer([bounded_prompt(p) for p in prompts]), self.pad_token_id)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate-layer hidden states (B, 77, D) and pooled projection (B, P) for each prompt.

        The pooled feature is taken at the first <|endoftext|> (open_clip's argmax of the ids),
        so it does not depend on the pad id; the hidden states after it do."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("encode takes a non-empty list of prompts")
        device = self.tower.token_embedding.weight.device
        tokens = self.tokenize(prompts).to(device)
        penultimate = len(self.tower.transformer.resblocks) - 2
        with torch.autocast(device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            out = self.tower.forward_intermediates(tokens, indices=[penultimate], output_fmt="NLC")
        return out["text_intermediates"][0].float(), out["text_features"].float()

    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached encoding of the empty prompt, (1, 77, D) and (1, P): the unconditional input."""
        device = self.tower.token_embedding.weight.device
        if device not in self._empty:
            self._empty[device] = self.encode([""])
        return self._empty[device]
