"""A folder shaped like the released Meissonic weights loads through `train.release` and samples
with the release's conventions: step-index timesteps, <|endoftext|> padding, upstream's
micro-conditions. Its config is the release's with 2 + 2 blocks instead of 14 + 28 (every name and
width of those blocks as released, random bf16 values; 0.3 GB instead of 2 GB on disk: a CI
machine once ran out of disk writing the full one); the full config is checked on the meta device.
A small HF-format CLIP text encoder and the tokenizer's pad token complete the folder."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from train import release
from train.convention import CONVENTIONS, EOT_TOKEN_ID
from train.model import build_model
from train.sampler import generate
from released import RELEASED_PARAMS, released_shapes  # tests/train/, on the path by conftest

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Upstream's transformer/config.json keys (Transformer2DModel.__init__ in src/transformer.py).
TRANSFORMER_CONFIG = {"_class_name": "Transformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 14,
                      "num_single_layers": 28, "attention_head_dim": 128, "num_attention_heads": 8,
                      "joint_attention_dim": 1024, "pooled_projection_dim": 1024, "guidance_embeds": False,
                      "axes_dims_rope": [16, 56, 56], "vocab_size": 8256, "codebook_size": 8192,
                      "downsample": True, "upsample": True}
# Real widths, fewer blocks: the folder's transformer is 144M parameters (all 14 + 28 blocks: 1.0B).
SMALL_DEPTH = {"num_layers": 2, "num_single_layers": 2}
# A small CLIPTextConfig of the width the transformer needs (the real one has 24 layers, MLP 4096).
TEXT_CONFIG = {"hidden_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 16, "intermediate_size": 1024,
               "projection_dim": 1024, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu"}


def shallow_released_shapes() -> dict[str, tuple[int, ...]]:
    """The released names and shapes, less the blocks past SMALL_DEPTH's counts."""
    limits = {"transformer_blocks": SMALL_DEPTH["num_layers"],
              "single_transformer_blocks": SMALL_DEPTH["num_single_layers"]}
    out = {}
    for name, shape in released_shapes().items():
        group, _, rest = name.partition(".")
        if group in limits and int(rest.split(".")[0]) >= limits[group]:
            continue
        out[name] = shape
    return out


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """bf16 tensors of these shapes cut from one random pool (drawing 1B values one by one costs
    ~10 s here; slices of a pool at random offsets are random enough for a loader test)."""
    gen = torch.Generator().manual_seed(seed)
    size = max(1 << 24, max(torch.Size(s).numel() for s in shapes.values()))
    pool = (torch.randn(size, generator=gen) * 0.02).to(torch.bfloat16)
    out = {}
    for name, shape in shapes.items():
        n = torch.Size(shape).numel()
        start = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=gen))
        out[name] = pool[start: start + n].clone().view(shape)
    return out


def hf_text_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Hugging Face CLIPTextModelWithProjection state dict."""
    h, i = c["hidden_size"], c["intermediate_size"]
    shapes = {"text_model.embeddings.token_embedding.weight": (c["vocab_size"], h),
              "text_model.embeddings.position_embedding.weight": (c["max_position_embeddings"], h),
              "text_model.final_layer_norm.weight": (h,), "text_model.final_layer_norm.bias": (h,),
              "text_projection.weight": (c["projection_dim"], h)}
    for layer in range(c["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{p}self_attn.{proj}.weight": (h, h), f"{p}self_attn.{proj}.bias": (h,)}
        shapes |= {f"{p}mlp.fc1.weight": (i, h), f"{p}mlp.fc1.bias": (i,), f"{p}mlp.fc2.weight": (h, i),
                   f"{p}mlp.fc2.bias": (h,)}
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{p}{norm}.weight": (h,), f"{p}{norm}.bias": (h,)}
    return shapes


@pytest.fixture(scope="module")
def release_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("meissonic")
    for sub in ("transformer", "text_encoder", "tokenizer"):
        (folder / sub).mkdir()
    (folder / "transformer" / "config.json").write_text(json.dumps(TRANSFORMER_CONFIG | SMALL_DEPTH))
    save_file(random_tensors(shallow_released_shapes(), seed=0), str(folder / "transformer" / release.WEIGHTS))
    (folder / "text_encoder" / "config.json").write_text(json.dumps(TEXT_CONFIG))
    save_file(random_tensors(hf_text_shapes(TEXT_CONFIG), seed=1), str(folder / "text_encoder" / "model.safetensors"))
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"}))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # 0.4 GB: not kept until the session ends


def test_release_config_is_the_1b_model_with_the_released_names_and_shapes():
    cfg = release.model_config(TRANSFORMER_CONFIG)
    assert cfg.downsample and cfg.dual_blocks == 14 and cfg.single_blocks == 28
    with torch.device("meta"):
        model = build_model(cfg)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == released_shapes()
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS


def test_release_loads_and_samples_with_its_own_conventions(release_folder):
    start = time.perf_counter()
    model, text, meta = release.load_release(release_folder, dtype=torch.bfloat16)
    assert model.cfg.downsample and model.cfg.dual_blocks == 2 and model.cfg.single_blocks == 2
    assert sum(p.numel() for p in model.parameters()) == 144_342_528
    assert (meta["convention"], meta["grid"], meta["sample_micro_conds"]) == ("meissonic", [64, 64],
                                                                             [1024.0, 1024.0, 0.0, 0.0, 6.0])
    assert text.pad_token_id == EOT_TOKEN_ID and text.autocast is None  # fp32 text, as upstream samples
    stored = release.transformer_weights(release_folder)["single_transformer_blocks.1.proj_out.weight"]
    assert torch.equal(model.single_transformer_blocks[1].proj_out.weight, stored)

    seen_t, seen_tokens = [], []
    model.time_text_embed.register_forward_pre_hook(lambda _m, args: seen_t.append(args[0].clone()))
    text.tower.token_embedding.register_forward_pre_hook(lambda _m, args: seen_tokens.append(args[0].clone()))
    codes = generate(model, text, ["a red fox in the snow"], (2, 2), meta["sample_micro_conds"], steps=2, cfg=9.0,
                     convention=CONVENTIONS[meta["convention"]], autocast=torch.bfloat16)
    assert codes.shape == (1, 2, 2) and 0 <= codes.min() and codes.max() < 8192
    # Timesteps: the step index counting down (1, 0), x1000 inside, for both CFG branches.
    assert [t.tolist() for t in seen_t] == [[1000.0, 1000.0], [0.0, 0.0]]
    prompt_tokens = seen_tokens[0][0]
    eot = int((prompt_tokens == EOT_TOKEN_ID).nonzero()[0])
    assert eot > 1 and (prompt_tokens[eot:] == EOT_TOKEN_ID).all()  # padded as the release's tokenizer pads
    print(f"release load + 2 sampling steps: {time.perf_counter() - start:.1f} s")


def test_release_pad_token_comes_from_its_tokenizer_folder(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    assert release.pad_token_id(tmp_path) == EOT_TOKEN_ID  # transformers' CLIPTokenizer default
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
    assert release.pad_token_id(tmp_path) == 0  # e.g. SD 2's tokenizer, which pads like open_clip
    (tmp_path / "tokenizer" / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<notatoken>"}))
    with pytest.raises(release.ReleaseError, match="not in the CLIP vocabulary"):
        release.pad_token_id(tmp_path)


def test_release_config_errors_are_clear(tmp_path):
    with pytest.raises(release.ReleaseError, match="lacks 'num_layers'"):
        release.model_config({k: v for k, v in TRANSFORMER_CONFIG.items() if k != "num_layers"})
    with pytest.raises(release.ReleaseError, match="guidance"):
        release.model_config(dict(TRANSFORMER_CONFIG, guidance_embeds=True))
    (tmp_path / "transformer").mkdir()
    with pytest.raises(release.ReleaseError, match="no diffusion_pytorch_model.safetensors"):
        release.transformer_weights(tmp_path)


def test_fine_tuning_a_release_uses_its_convention(tmp_path, make_code_folder):
    """init_from a release folder: the weights load (a tiny model stands in for the 1B one), the
    run's convention becomes "meissonic" (captions padded with <|endoftext|>, upstream's timestep
    inputs) and is recorded; a stage without the 2x2 layers is refused with the reason."""
    import dataclasses

    from core.config import REPO_PIPELINES, ConfigError, parse_sets
    from train import checkpoint
    from train.model import MODELS
    from train.stages import load_stage
    from train.trainer import run

    data = make_code_folder(tmp_path / "codes", rows_per_shard=(8,))
    folder = tmp_path / "release"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(TRANSFORMER_CONFIG))
    tiny = build_model(dataclasses.replace(MODELS["debug"].with_codebook(16), downsample=True))
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(folder / "transformer" / release.WEIGHTS))
    sets = ["threads=1", "tensorboard=false", "sample.every=0", "steps=2", "log_every=1", "ckpt_every=2",
            f"data.path={data}", f"init_from={folder}"]
    with pytest.raises(ConfigError, match="compression layers"):
        run(load_stage("debug", REPO_PIPELINES, parse_sets(sets)), "debug", tmp_path / "flat")
    run(load_stage("debug", REPO_PIPELINES, parse_sets(sets + ["downsample=true"])), "debug", tmp_path / "ft")
    meta = checkpoint.load_meta(checkpoint.latest(tmp_path / "ft"))
    assert meta["convention"] == "meissonic"
