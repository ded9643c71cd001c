"""`curate neardup` and `curate score` through the CLI: wiring, precedence, user errors."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from curate.cli import app
from image_shards_fixture import neardup_shards

runner = CliRunner()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return neardup_shards(tmp_path_factory.mktemp("cli") / "shards")


def test_help_documents_the_options() -> None:
    for command, option in (("neardup", "--distance"), ("score", "--aesthetic-model")):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and option in result.output


def test_near_dup_flags_override_yaml(shards, tmp_path, ray_local) -> None:
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(yaml.safe_dump({"curate": {"neardup": {"distance": 0, "placeholder_hosts": 3}}}))
    out = tmp_path / "nd"
    result = runner.invoke(app, ["neardup", "-i", str(shards), "-o", str(out), "--distance", "4",
                                 "--write-shards", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load((out / "_config.yaml").read_text())["config"]["settings"]
    assert (resolved["distance"], resolved["placeholder_hosts"], resolved["write_shards"]) == (4, 3, True)
    assert "neardup: 13 rows in" in result.output and "2 duplicate groups" in result.output
    assert pq.read_table(out / "keep.parquet").num_rows == 4
    assert (out / "00000.tar").exists()


@pytest.mark.parametrize("args, message", [
    (["neardup", "-i", "/nonexistent/shards", "-o", "OUT"], "no such shard folder"),
    (["neardup", "-i", "SHARDS", "-o", "OUT", "--distance", "99"], "distance must be in 0..16"),
    (["score", "-i", "SHARDS", "-o", "OUT", "--no-nsfw"], "nothing to score"),
    (["score", "-i", "SHARDS", "-o", "OUT", "--aesthetic-model", "a.pth"], "also give clip_model"),
    (["score", "-i", "SHARDS", "-o", "OUT", "--watermark-model", "/m/watermark_model_v1.pt"],
     "watermark checkpoint not found: /m/watermark_model_v1.pt"),
])
def test_user_errors_are_one_line_exit_2(args, message, shards, tmp_path) -> None:
    args = [str(shards) if a == "SHARDS" else str(tmp_path / "out") if a == "OUT" else a for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_unknown_yaml_key_is_named(shards, tmp_path) -> None:
    cfg = tmp_path / "pipelines.yaml"
    cfg.write_text(yaml.safe_dump({"curate": {"neardup": {"distanse": 3}}}))
    result = runner.invoke(app, ["neardup", "-i", str(shards), "-o", str(tmp_path / "o"), "-c", str(cfg)])
    assert result.exit_code == 2 and "unknown key 'distanse'" in result.output


def test_near_dup_then_score_on_ray_actors_without_copying(shards, tmp_path, ray_local) -> None:
    # `score` on a neardup output folder scores the kept samples of the original shards,
    # in a Ray actor that loads a tiny CLIP from its config JSON + checkpoint and the NSFW model.
    from scorer_models_fixture import TINY_CLIP_NAME, tiny_clip_files

    clip_cfg, clip_ckpt = tiny_clip_files(tmp_path)
    nd = tmp_path / "nd"
    result = runner.invoke(app, ["neardup", "-i", str(shards), "-o", str(nd), "--placeholder-hosts", "3"])
    assert result.exit_code == 0, result.output
    assert not list(nd.glob("*.tar"))
    out = tmp_path / "scored"
    args = ["score", "-i", str(nd), "-o", str(out), "--nsfw", "--actors", "1", "--clip-model", str(clip_ckpt),
            "--clip-arch", TINY_CLIP_NAME, "--clip-config", str(clip_cfg), "--no-clip-quick-gelu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "score: 4 rows in" in result.output
    scored = {r["key"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(scored) == sorted(pq.read_table(nd / "keep.parquet")["key"].to_pylist())
    assert all(0 <= r["punsafe"] < 0.2 and -1 <= r["similarity"] <= 1 for r in scored.values())
    assert scored["000010000"]["aesthetic"] == 6.5  # not computed: the json's value is kept
    marker = out / "_done" / "score.00001.json"
    before = marker.stat().st_mtime_ns
    again = runner.invoke(app, args)  # rerun: every shard done, no actor started
    assert again.exit_code == 0 and marker.stat().st_mtime_ns == before
