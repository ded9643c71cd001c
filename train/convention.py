"""How a model reads its inputs: the mask-ratio condition and the text padding.

A trained transformer only works with the inputs it was trained on, so every run records its
convention (checkpoint `meta.json`) and sampling or fine-tuning uses the recorded one.

``tessera`` (runs trained here): the model's ``timestep`` input is ``masking.cond_value`` of the
fraction of tokens masked, in training (the fraction actually masked) and in sampling (the
fraction still masked) alike; the transformer multiplies it by 1000, so its sinusoid sees
1000·r in [0, 1000]. Captions are padded with open_clip's pad id 0 after <|endoftext|>.

``meissonic`` (the released weights, read from upstream's code, github.com/viiika/Meissonic):
- training (``train/train_meissonic.py``): ``timestep = mask_prob * 1000`` with
  ``mask_prob = cos(pi t / 2)`` (the drawn ratio, before rounding to a token count); the
  transformer (``src/transformer.py``) computes ``timestep.to(hidden_states.dtype) * 1000``, so
  the sinusoid saw r·10^6, rounded twice to bf16 under the bf16 autocast the release trained with;
- sampling (``src/pipeline.py`` + ``src/scheduler.py``): ``timestep`` is the step index counting
  down, S-1 ... 0, as a long tensor cast to the model's dtype (x1000 inside: 47000 ... 0 for 48
  steps);
- text: the Hugging Face ``CLIPTokenizer`` with ``padding="max_length"`` pads with its pad token,
  which defaults to <|endoftext|> (49407) in ``transformers``; the MM-DiT attends to all 77
  positions, so the padding is part of the input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from train.masking import cond_value

EOT_TOKEN_ID = 49407  # CLIP's <|endoftext|>
OPEN_CLIP_PAD_ID = 0  # open_clip's tokenizer fills the rest of the 77 positions with 0


@dataclass(frozen=True)
class Convention:
    name: str  # key in CONVENTIONS, recorded in checkpoints
    pad_token_id: int  # id written after <|endoftext|> up to the context length
    upstream: bool  # True: reproduce upstream Meissonic's timestep inputs (see the module docstring)

    def train_timestep(self, masked_ratio: torch.Tensor, drawn_ratio: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
        """The model's ``timestep`` (B,) for a training micro-batch.

        masked_ratio (B,): fraction of tokens actually masked; drawn_ratio (B,): cos(pi t / 2)
        before rounding; dtype: the compute dtype of the forward (bf16 under autocast, else fp32)."""
        if not self.upstream:
            return cond_value(masked_ratio)
        # Upstream casts to the compute dtype here, and the model multiplies in that dtype.
        return (drawn_ratio.float() * 1000.0).to(dtype)

    def sample_timestep(self, step: int, steps: int, masked_ratio: torch.Tensor,
                        dtype: torch.dtype) -> torch.Tensor:
        """The model's ``timestep`` (B,) at sampling step ``step`` (0-based) of ``steps``;
        masked_ratio (B,): fraction of tokens still masked before this step."""
        if not self.upstream:
            return cond_value(masked_ratio)
        return torch.full_like(masked_ratio, float(steps - 1 - step), dtype=dtype)


CONVENTIONS: dict[str, Convention] = {
    "tessera": Convention("tessera", pad_token_id=OPEN_CLIP_PAD_ID, upstream=False),
    "meissonic": Convention("meissonic", pad_token_id=EOT_TOKEN_ID, upstream=True),
}


def get(name: str) -> Convention:
    if name not in CONVENTIONS:
        raise ValueError(f"unknown convention {name!r} (known: {', '.join(CONVENTIONS)})")
    return CONVENTIONS[name]


def pad_after_eot(tokens: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """tokens (B, T) as open_clip writes them ([SOT] text [EOT] 0 0 ...) -> the same with every
    position after the first <|endoftext|> set to ``pad_token_id`` (the EOT itself is kept)."""
    if pad_token_id == OPEN_CLIP_PAD_ID:
        return tokens
    is_eot = tokens == EOT_TOKEN_ID
    seen = is_eot.int().cumsum(dim=1)  # (B, T): EOTs up to and including each position
    after = (seen > 0) & ~(is_eot & (seen == 1))  # strictly after the first EOT
    return torch.where(after, torch.full_like(tokens, pad_token_id), tokens)
