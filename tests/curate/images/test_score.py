"""curate score: per-shard scoring with every scorer, batching, ledger, Ray actors, reruns."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from core import keeplist
from curate.images import score
from curate.images.score import ScoreConfig
from curate.images.scorers import ScorerError
from image_shards_fixture import score_shard
from scorer_models_fixture import all_models


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    return all_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    return score_shard(tmp_path_factory.mktemp("score") / "shards")


@pytest.fixture(scope="module")
def scorers(models):
    torch.set_num_threads(1)
    return score.Scorers(ScoreConfig(**models, batch_size=3))


def test_config_validation(models) -> None:
    with pytest.raises(ValueError, match="nothing to score"):
        ScoreConfig()
    with pytest.raises(ValueError, match="also give clip_model"):
        ScoreConfig(aesthetic_model="a.pth")
    with pytest.raises(ValueError, match="actors"):
        ScoreConfig(nsfw=True, actors=0)
    assert ScoreConfig(**models).scores() == ["aesthetic", "pwatermark", "similarity", "punsafe"]
    assert ScoreConfig(nsfw=True).scores() == ["punsafe"]


def test_score_shard_fills_laion_columns_and_ledgers_bad_images(scorers, shard) -> None:
    table, led = score.score_shard(scorers, shard, scorers.cfg)
    rows = table.to_pylist()
    assert table.schema == score.OUTPUT_SCHEMA
    assert [r["key"] for r in rows] == ["000000000", "000000001", "000000002", "000000003"]
    assert rows[0]["URL"] == "http://s.com/astronaut.jpg" and rows[0]["TEXT"] == "a photo of astronaut"
    assert (rows[0]["WIDTH"], rows[0]["HEIGHT"]) == (512, 512) and rows[0]["hash"] == 0
    for col in score.SCORE_COLUMNS:
        values = np.array([r[col] for r in rows], dtype=float)
        assert np.isfinite(values).all() and np.unique(values.round(7)).size > 1, col
    assert all(0 <= r["pwatermark"] <= 1 and 0 <= r["punsafe"] < 0.2 and -1 <= r["similarity"] <= 1 for r in rows)
    states = led.to_pylist()
    assert [s["state"] for s in states] == ["kept"] * 4 + ["failed"]
    assert "undecodable image" in states[4]["reason"] and states[4]["row"] == 4


def test_batching_does_not_change_scores(scorers, shard) -> None:
    batched, _ = score.score_shard(scorers, shard, scorers.cfg)  # batch_size 3: batches of 3 + 1
    scorers.cfg.batch_size = 64
    try:
        whole, _ = score.score_shard(scorers, shard, scorers.cfg)
    finally:
        scorers.cfg.batch_size = 3
    threaded, led = score.score_shard(scorers, shard, scorers.cfg, threads=2)  # decode-ahead pool
    assert threaded["key"].to_pylist() == whole["key"].to_pylist()
    assert [r["state"] for r in led.to_pylist()] == ["kept"] * 4 + ["failed"]
    for col in score.SCORE_COLUMNS:
        assert np.allclose(batched[col].to_numpy(), whole[col].to_numpy(), atol=1e-5), col
        assert np.allclose(threaded[col].to_numpy(), whole[col].to_numpy(), atol=1e-5), col


def test_scores_not_computed_keep_the_metadata_values(shard) -> None:
    nsfw_only = ScoreConfig(nsfw=True)
    table, led = score.score_shard(score.Scorers(nsfw_only), shard, nsfw_only)
    # pwatermark 0.25 is in every sample's json; no aesthetic there: null.
    assert table["pwatermark"].to_pylist() == [0.25] * 4
    assert table["aesthetic"].null_count == 4 and table["similarity"].null_count == 4
    assert table["punsafe"].null_count == 0


def test_missing_checkpoint_fails_before_any_work(tmp_path, shard) -> None:
    cfg = ScoreConfig(watermark_model=str(tmp_path / "watermark_model_v1.pt"))
    with pytest.raises(ScorerError, match="watermark checkpoint not found: .*watermark_model_v1.pt"):
        score.run(cfg, str(shard.parent), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_model_errors_raised_in_ray_workers_keep_their_message(ray_local) -> None:
    # A checkpoint that fails to load inside an actor reaches the driver wrapped in Ray's
    # error (with the remote traceback); the user sees the loader's own one-line message.
    def _load_fails(path: str) -> None:  # nested: Ray ships it by value (tests are not importable there)
        raise ScorerError(f"watermark checkpoint {path} does not match architecture 'efficientnet_b3a'")

    with pytest.raises(ray_local.exceptions.RayError) as info:
        ray_local.get(ray_local.remote(_load_fails).remote("/m/watermark_model_v1.pt"))
    assert score._cause_message(info.value, ScorerError) == (
        "watermark checkpoint /m/watermark_model_v1.pt does not match architecture 'efficientnet_b3a'")
    assert score._cause_message(RuntimeError("other"), ScorerError) is None


def test_aesthetic_checkpoint_must_fit_the_clip_embedding(models, tmp_path) -> None:
    from scorer_models_fixture import tiny_aesthetic_file

    wrong = tiny_aesthetic_file(tmp_path, dim=16)  # the tiny CLIP gives 32-d embeddings
    cfg = ScoreConfig(**{**models, "aesthetic_model": str(wrong), "watermark_model": None, "nsfw": False})
    with pytest.raises(ScorerError, match="expects 16-d embeddings but CLIP tessera-tiny-clip gives 32-d"):
        score.Scorers(cfg)


def test_keep_list_limits_the_input_rows(scorers, shard, tmp_path) -> None:
    table, led = score.score_shard(scorers, shard, scorers.cfg, keep=frozenset({"000000001", "000000004"}))
    assert table["key"].to_pylist() == ["000000001"]
    assert [(r["key"], r["row"], r["state"]) for r in led.to_pylist()] == [
        ("000000001", 1, "kept"), ("000000004", 4, "failed")]


def test_near_dup_output_folder_stands_for_its_shards_and_keep_list(shard, tmp_path) -> None:
    nd = tmp_path / "neardup"
    nd.mkdir()
    (nd / "_config.yaml").write_text(yaml.safe_dump({"step": "neardup", "hash": "x",
                                                      "config": {"input": {"path": str(shard.parent)}}}))
    pq.write_table(pa.table({"key": ["000000000", "000000002"], "shard": ["00000.tar", "00000.tar"]}),
                   nd / "keep.parquet")
    inp, cfg = score.resolve_input(str(nd), ScoreConfig(nsfw=True))
    assert inp == str(shard.parent) and cfg.keep_list == str(nd / "keep.parquet")
    assert keeplist.keys_for(cfg.keep_list, "00000") == {"000000000", "000000002"}
    # A plain shard folder is used as it is.
    assert score.resolve_input(str(shard.parent), ScoreConfig(nsfw=True))[0] == str(shard.parent)
    with pytest.raises(FileNotFoundError, match="keep list not found"):
        score.check_paths(ScoreConfig(nsfw=True, keep_list=str(tmp_path / "nope.parquet")))
