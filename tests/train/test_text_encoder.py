"""Frozen open_clip text tower: loading from local checkpoints, penultimate states, pooled projection."""
from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from train.model import MODELS
from train.convention import pad_after_eot
from train.text_encoder import TextEncoder, register_tiny_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip_model() -> torch.nn.Module:
    """A whole tiny CLIP (text + vision), like the file a user downloads; random weights."""
    torch.manual_seed(3)
    return open_clip.create_model(register_tiny_config()).eval()


def reference_encoding(clip: torch.nn.Module, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate states and pooled features computed directly from open_clip's CLIP pieces."""
    tokens = open_clip.get_tokenizer(register_tiny_config())(prompts)
    x = clip.token_embedding(tokens) + clip.positional_embedding
    for block in clip.transformer.resblocks[:-1]:
        x = block(x, attn_mask=clip.attn_mask)
    with torch.no_grad():
        return x.detach(), clip.encode_text(tokens)


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "folder"])
def test_from_checkpoint_loads_text_tower_of_a_full_clip_checkpoint(tmp_path, clip_model, fmt):
    state = {k: v.contiguous() for k, v in clip_model.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "clip.safetensors"
        save_file(state, str(path))
    else:
        path = tmp_path / ("open_clip_pytorch_model.bin" if fmt == "folder" else "clip.bin")
        torch.save(state, path)
    enc = TextEncoder.from_checkpoint(tmp_path if fmt == "folder" else path, model_name=register_tiny_config())
    assert not any(k.startswith("visual") for k in enc.state_dict())
    prompts = ["a red bicycle", "two cats on a sofa, oil painting"]
    hidden, pooled = enc.encode(prompts)
    ref_hidden, ref_pooled = reference_encoding(clip_model, prompts)
    assert hidden.shape == (2, 77, 64) and pooled.shape == (2, 64)
    assert torch.allclose(hidden, ref_hidden, atol=1e-5) and torch.allclose(pooled, ref_pooled, atol=1e-5)


def test_bad_checkpoints_fail_clearly(tmp_path, clip_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextEncoder.from_checkpoint(tmp_path / "nope.bin", model_name=register_tiny_config())
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin"):
        TextEncoder.from_checkpoint(tmp_path, model_name=register_tiny_config())
    visual_only = {k: v for k, v in clip_model.state_dict().items() if k.startswith("visual.")}
    torch.save(visual_only, tmp_path / "visual.bin")
    with pytest.raises(ValueError, match="lacks text-tower tensors"):
        TextEncoder.from_checkpoint(tmp_path / "visual.bin", model_name=register_tiny_config())
    with pytest.raises(ValueError, match="unknown open_clip model"):
        TextEncoder.from_checkpoint(tmp_path / "visual.bin", model_name="no-such-model")


def test_tiny_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = TextEncoder.tiny(0), TextEncoder.tiny(0), TextEncoder.tiny(1)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["tower.token_embedding.weight"], sc["tower.token_embedding.weight"])


def test_tiny_matches_debug_model_widths():
    enc = TextEncoder.tiny()
    cfg = MODELS["debug"]
    assert (enc.hidden_dim, enc.pooled_dim, enc.context_length) == (cfg.text_dim, cfg.pooled_dim, 77)


def test_encode_is_frozen_prompt_dependent_and_empty_is_cached():
    enc = TextEncoder.tiny()
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    hidden, pooled = enc.encode(["a photo of a dog", "a photo of a cat", ""])
    assert not hidden.requires_grad
    assert not torch.allclose(pooled[0], pooled[1])
    assert torch.allclose(hidden[0, :4], hidden[1, :4])  # causal: same prefix tokens, same states
    assert not torch.allclose(hidden[0, 4:6], hidden[1, 4:6])
    empty_hidden, empty_pooled = enc.empty()
    assert empty_hidden.shape == (1, 77, 64) and empty_pooled.shape == (1, 64)
    # Equal up to float32 rounding: a batch of 1 and a batch of 3 may take different matmul kernels
    # (seen on an AVX2-only CPU: pooled values of magnitude ~2.5 apart by 1.6e-6).
    assert torch.allclose(empty_hidden[0], hidden[2], rtol=1e-5, atol=1e-5)
    assert torch.allclose(empty_pooled[0], pooled[2], rtol=1e-5, atol=1e-5)
    assert enc.empty()[0] is empty_hidden
    with pytest.raises(ValueError, match="list of prompts"):
        enc.encode("a bare string")


def to_hf_names(tower_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write an open_clip text tower under Hugging Face CLIPTextModelWithProjection's names."""
    hf = {"text_model.embeddings.token_embedding.weight": tower_state["token_embedding.weight"],
          "text_model.embeddings.position_embedding.weight": tower_state["positional_embedding"],
          "text_model.final_layer_norm.weight": tower_state["ln_final.weight"],
          "text_model.final_layer_norm.bias": tower_state["ln_final.bias"],
          "text_projection.weight": tower_state["text_projection"].t().contiguous()}
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
               "attn.out_proj": "self_attn.out_proj"}
    layers = {int(k.split(".")[2]) for k in tower_state if k.startswith("transformer.resblocks.")}
    for i in layers:
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            for (name, part) in zip("qkv", tower_state[f"{src}attn.in_proj_{kind}"].chunk(3)):
                hf[f"{dst}self_attn.{name}_proj.{kind}"] = part.contiguous()
            for oc, hf_name in renames.items():
                hf[f"{dst}{hf_name}.{kind}"] = tower_state[f"{src}{oc}.{kind}"]
    return hf


def test_from_checkpoint_reads_hugging_face_text_encoder_folders(tmp_path):
    tiny = TextEncoder.tiny(seed=5)
    hf = to_hf_names({k: v for k, v in tiny.tower.state_dict().items() if k != "attn_mask"})
    save_file(hf, str(tmp_path / "model.safetensors"))  # the layout of Meissonic's text_encoder/ folder
    loaded = TextEncoder.from_checkpoint(tmp_path, model_name=register_tiny_config())
    prompts = ["a lighthouse at dusk", ""]
    for ours, ref in zip(loaded.encode(prompts), tiny.encode(prompts)):
        assert torch.equal(ours, ref)


def test_a_very_long_prompt_is_cut_before_tokenizing_with_the_same_ids():
    import random

    from train.text_encoder import PROMPT_CHARS, bounded_prompt

    enc = TextEncoder.tiny()
    rng = random.Random(0)
    words = " ".join("".join(rng.choice("abcdefghij,.") for _ in range(rng.randint(1, 12))) for _ in range(12_000))
    spaced = "a  cat\n" + " " * 60_000 + "\t on a mat " + words  # a whitespace run larger than the cut
    one_word = "x" * (PROMPT_CHARS + 5000) + " tail"
    for text in (words, spaced, one_word):
        assert len(text) > PROMPT_CHARS and len(bounded_prompt(text)) <= PROMPT_CHARS
        assert torch.equal(enc.tokenize([text]), pad_after_eot(enc.tokenizer([text]), enc.pad_token_id))
    assert bounded_prompt("short  text ") == "short  text "  # short prompts are left as they are
