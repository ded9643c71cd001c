"""Scorer loaders: tiny same-architecture models saved to disk and loaded back through the
loader a real checkpoint takes; the NSFW model is the real one, on real photos."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from curate.images.scorers import ScorerError
from curate.images.scorers import aesthetic, clip_sim, nsfw, watermark
from image_shards_fixture import photo
from scorer_models_fixture import TINY_CLIP, tiny_clip_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_aesthetic_module_names_match_the_released_checkpoint(tmp_path) -> None:
    real = aesthetic.AestheticMLP(768)
    assert set(real.state_dict()) == set(aesthetic.EXPECTED_KEYS)
    shapes = {k: tuple(v.shape) for k, v in real.state_dict().items() if k.endswith("weight")}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.2.weight": (128, 1024), "layers.4.weight": (64, 128),
                      "layers.6.weight": (16, 64), "layers.7.weight": (1, 16)}


def test_aesthetic_round_trip_and_normalisation(tmp_path) -> None:
    torch.manual_seed(1)
    mlp = aesthetic.AestheticMLP(32).eval()
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(mlp.state_dict(), path)
    loaded = aesthetic.load_aesthetic(path)
    emb = torch.randn(5, 32)
    scores = aesthetic.aesthetic_scores(loaded, emb * 7.0)  # scale must not matter: L2-normalised inside
    expected = mlp(torch.nn.functional.normalize(emb, dim=-1)).squeeze(-1)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert aesthetic.input_size(loaded) == 32 and scores.std() > 0


def test_aesthetic_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(ScorerError, match="aesthetic checkpoint not found: .*nope.pth"):
        aesthetic.load_aesthetic(tmp_path / "nope.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"layers.0.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ScorerError, match="wrong.pth does not match the LAION aesthetic MLP"):
        aesthetic.load_aesthetic(wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ScorerError, match="garbage.pth could not be read"):
        aesthetic.load_aesthetic(garbage)


def test_watermark_real_architecture_round_trip(tmp_path) -> None:
    torch.manual_seed(2)
    model = watermark.build_watermark_model("efficientnet_b3a").eval()
    head = [m for m in model.classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in head] == [(1536, 625), (625, 256), (256, 2)]
    path = tmp_path / "watermark_model_v1.pt"
    torch.save(model.state_dict(), path)
    loaded = watermark.load_watermark(path)
    images = [photo("astronaut"), photo("coffee")]
    scores = watermark.watermark_scores(loaded, images)
    batch = torch.stack([watermark.preprocess(im) for im in images])
    assert batch.shape == (2, 3, 256, 256)
    with torch.no_grad():
        expected = torch.softmax(model(batch), dim=1)[:, 0]
    assert torch.allclose(scores, expected, atol=1e-5)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_watermark_refuses_another_architecture(tmp_path) -> None:
    small = watermark.build_watermark_model("test_efficientnet")
    path = tmp_path / "small.pt"
    torch.save(small.state_dict(), path)
    assert watermark.load_watermark(path, "test_efficientnet") is not None  # --watermark-arch works
    with pytest.raises(ScorerError, match="small.pt does not match architecture 'efficientnet_b3a'"):
        watermark.load_watermark(path)
    with pytest.raises(ScorerError, match="not a timm model"):
        watermark.build_watermark_model("no_such_net")


def test_clip_round_trip_embeddings_and_similarity(tmp_path) -> None:
    import open_clip

    cfg, ckpt = tiny_clip_files(tmp_path)
    clip = clip_sim.load_clip(ckpt, "tessera-tiny-clip", quick_gelu=False, config_path=cfg)
    images = [photo("astronaut"), photo("rocket"), photo("coffee")]
    texts = ["an astronaut", "a rocket", "a cup of coffee"]
    img, txt = clip_sim.embed_images(clip, images), clip_sim.embed_texts(clip, texts)
    assert img.shape == txt.shape == (3, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    # The loaded weights are the saved ones: same embeddings as the in-memory original.
    torch.manual_seed(0)
    original = open_clip.create_model("tessera-tiny-clip").eval()
    with torch.no_grad():
        ref = original.encode_image(torch.stack([clip.preprocess(im) for im in images]))
    assert torch.allclose(img, torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)
    sim = clip_sim.cosine(img, txt)
    assert sim.shape == (3,) and (sim.abs() <= 1).all() and sim.std() > 0


def test_clip_errors_name_the_file(tmp_path) -> None:
    cfg, ckpt = tiny_clip_files(tmp_path)
    other = dict(TINY_CLIP, embed_dim=16)
    other_cfg = tmp_path / "tessera-tiny-clip-16.json"
    other_cfg.write_text(json.dumps(other))
    with pytest.raises(ScorerError, match="tessera-tiny-clip.pt does not match open_clip architecture"):
        clip_sim.load_clip(ckpt, "tessera-tiny-clip-16", quick_gelu=False, config_path=other_cfg)
    with pytest.raises(ScorerError, match="unknown open_clip architecture 'ViT-Q-99'"):
        clip_sim.load_clip(ckpt, "ViT-Q-99")
    with pytest.raises(ScorerError, match="CLIP checkpoint not found"):
        clip_sim.load_clip(tmp_path / "missing.pt")


def test_nsfw_real_model_scores_safe_photos_low_and_distinct() -> None:
    classifier = nsfw.load_nsfw()
    names = ("astronaut", "coffee", "chelsea", "rocket")
    scores = nsfw.nsfw_scores(classifier, [photo(n) for n in names])
    assert scores.shape == (4,)
    assert (scores < 0.2).all(), dict(zip(names, scores.tolist()))  # Yahoo: < 0.2 is safe
    assert np.unique(np.round(scores, 6)).size == 4  # a real model: one score per image, not a constant
    with pytest.raises(ScorerError, match="NSFW ONNX checkpoint not found"):
        nsfw.load_nsfw("/nonexistent/open_nsfw.onnx")


def test_clip_loads_openai_torchscript_archive(tmp_path) -> None:
    # OpenAI's own release (`clip.load` downloads ViT-L-14.pt) is a TorchScript archive: the
    # loader rebuilds the model from its weights. A tiny QuickGELU CLIP, scripted and saved.
    import open_clip

    cfg = dict(TINY_CLIP, quick_gelu=True, text_cfg=dict(TINY_CLIP["text_cfg"], heads=1))  # OpenAI: width/64 heads
    _, _ = tiny_clip_files(tmp_path, "tessera-tiny-openai", cfg)
    torch.manual_seed(5)
    original = open_clip.create_model("tessera-tiny-openai").eval()
    archive = tmp_path / "ViT-L-14.pt"
    torch.jit.save(torch.jit.script(original), str(archive))
    assert clip_sim.is_torchscript(archive) and not clip_sim.is_torchscript(tmp_path / "tessera-tiny-openai.pt")
    clip = clip_sim.load_clip(archive, "tessera-tiny-openai")
    images = [photo("astronaut"), photo("coffee")]
    batch = torch.stack([clip.preprocess(im) for im in images])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(original.encode_image(batch), dim=-1)
        ref_txt = torch.nn.functional.normalize(original.encode_text(clip.tokenizer(["a", "b"])), dim=-1)
    # OpenAI's weights are fp16: the loader stores them so, hence the fp16-sized tolerance.
    assert torch.allclose(clip_sim.embed_images(clip, images), ref, atol=5e-3)
    assert torch.allclose(clip_sim.embed_texts(clip, ["a", "b"]), ref_txt, atol=5e-3)
