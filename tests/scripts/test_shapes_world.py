"""scripts/shapes_world.py: captions say what the pixels hold, held-out combinations never reach
the training metadata (while their pairs do), and `judge` passes right pictures and fails wrong ones."""
from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import shapes_world as W


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_captions_match_pixels():
    names = list(W.COLOURS)
    for _, data, caption, size in W.training_items(per_combo=1):
        img, want = decode(data), W.parse_caption(caption)
        assert img.shape == (size[1], size[0], 3)
        # Read straight off the pixels: exactly two palette colours fill flat areas, the caption's
        # background the larger one, its shape colour the other (anti-aliased edges are neither).
        exact = {name: int(np.all(img == W.COLOURS[name], axis=-1).sum()) for name in names}
        present = sorted((n for n in names if exact[n]), key=exact.get, reverse=True)
        assert present == [want.background, want.colour], (caption, exact)
        assert W.judge(img, want).right, caption


def test_held_out_combos_absent_from_training_but_their_pairs_present():
    held = set(W.held_out(6, seed=0))
    trained = {W.parse_caption(c) for _, _, c, _ in W.training_items(per_combo=2, holdout=6, seed=0)}
    assert len(held) == 6 and not held & trained
    assert trained | held == set(W.all_combos())
    seen_pairs = set().union(*(W.pairs(c) for c in trained))
    for c in held:
        assert W.pairs(c) <= seen_pairs, c


def test_held_out_is_seeded_and_refuses_too_many():
    assert W.held_out(6, seed=1) == W.held_out(6, seed=1) != W.held_out(6, seed=0)
    with pytest.raises(ValueError, match="share no pair"):
        W.held_out(40)


def test_judge_passes_the_right_picture_and_fails_wrong_ones():
    want = W.Combo("triangle", "red", "blue")
    right = np.asarray(W.render(want, 30, 34, 28))
    v = W.judge(right, want)
    assert v.right and (v.shape, v.colour, v.background) == ("triangle", "red", "blue")
    wrong_colour = np.asarray(W.render(W.Combo("triangle", "yellow", "blue"), 30, 34, 28))
    assert not W.judge(wrong_colour, want).colours_right
    wrong_background = np.asarray(W.render(W.Combo("triangle", "red", "green"), 30, 34, 28))
    assert not W.judge(wrong_background, want).right
    wrong_shape = W.judge(np.asarray(W.render(W.Combo("square", "red", "blue"), 30, 34, 28)), want)
    assert wrong_shape.colours_right and not wrong_shape.right and wrong_shape.shape == "square"
    blank = np.full((64, 64, 3), W.COLOURS["blue"], np.uint8)
    assert not W.judge(blank, want).colours_right
    noisy = np.clip(right.astype(int) + np.random.default_rng(0).integers(-40, 41, right.shape), 0, 255)
    assert W.judge(noisy.astype(np.uint8), want).right  # sampling noise does not change the verdict


def test_parse_caption_refuses_other_text():
    assert W.parse_caption("a white circle on a black background") == W.Combo("circle", "white", "black")
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        W.parse_caption("a purple circle on a black background")


def test_served_world_has_laion_metadata(tmp_path):
    import demo_web

    n = demo_web.build_corpus(tmp_path, demo_web.shape_items(1, 0), port=8123, seed=0)
    table = pq.read_table(tmp_path / "meta" / "part-00000.parquet").to_pandas()
    assert n == len(table) == 84
    assert {"URL", "TEXT", "WIDTH", "HEIGHT", "similarity", "hash", "punsafe", "pwatermark", "aesthetic"} <= set(table)
    assert table["hash"].is_unique and table["URL"].str.startswith("http://127.0.0.1:8123/").all()
    first = tmp_path / "www" / table["URL"][0].rsplit("/", 1)[1]
    assert W.judge(decode(first.read_bytes()), W.parse_caption(table["TEXT"][0])).right


def test_rejects_are_exactly_the_rows_the_demo_filter_drops(tmp_path):
    """The served world's extra rows fail the demo pipelines' thresholds (aesthetic >= 4.5,
    pwatermark <= 0.5), half by each; every training picture passes both, none is held out."""
    import demo_web

    rejects = list(demo_web.shape_rejects(8, 0))  # one per 8 training pictures: 84 of 672
    assert len(rejects) == 84 and not {W.parse_caption(r[2]) for r in rejects} & set(W.held_out())
    n = demo_web.build_corpus(tmp_path, demo_web.shape_items(8, 0), port=8123, seed=0, rejects=rejects)
    t = pq.read_table(tmp_path / "meta" / "part-00000.parquet").to_pandas()
    assert n == len(t) == 672 + 84 and t["hash"].is_unique
    low, marked = t["aesthetic"] < 4.5, t["pwatermark"] > 0.5
    assert low.sum() == marked.sum() == 42 and not (low & marked).any()
    assert ((low | marked) == t["URL"].str.contains("/reject")).all()


def test_write_shards_reads_back_as_download_output(tmp_path):
    import demo_web
    from core.imageshard import iter_shard, list_shards

    n = demo_web.write_shards(tmp_path, demo_web.shape_items(1, 0), size=64, per_shard=50)
    samples = [s for tar in list_shards(tmp_path) for s in iter_shard(tar)]
    assert n == len(samples) == 84 and len(list_shards(tmp_path)) == 2
    assert samples[0].key == "000000000" and samples[-1].key == "000010033" and samples[0].image_ext == "png"
    assert all(W.judge(decode(s.image), W.parse_caption(s.caption)).right for s in samples[::7])


def test_write_shards_resizes_and_leaves_out_what_a_download_would_fail(tmp_path):
    import demo_web
    from core.imageshard import iter_shard, list_shards

    big = Image.new("RGB", (160, 120), (10, 200, 30))
    items = [("a.png", W.png(big), "wide", (160, 120)), ("dead.jpg", None, "dead", (160, 160)),
             ("bad.jpg", b"not an image", "corrupt", (160, 160))]
    assert demo_web.write_shards(tmp_path, items, size=64) == 1
    (sample,) = [s for tar in list_shards(tmp_path) for s in iter_shard(tar)]
    assert sample.image_ext == "jpg" and Image.open(io.BytesIO(sample.image)).size == (64, 64)


def test_judge_cli_reads_a_sample_grid(tmp_path):
    import subprocess
    import sys

    held = W.held_out()
    rng = np.random.default_rng(0)
    grid = Image.new("RGB", (2 * W.SIZE, len(held) * W.SIZE))
    for r, c in enumerate(held):  # row r: the prompt's combo, then (last row) a wrong colour
        right = W.random_image(c, rng)
        wrong = W.random_image(W.Combo(c.shape, c.background, c.colour), rng)  # colours swapped
        grid.paste(right, (0, r * W.SIZE))
        grid.paste(wrong if r == len(held) - 1 else right, (W.SIZE, r * W.SIZE))
    grid.save(tmp_path / "grid.png")
    verdicts = W.judge_grid(tmp_path / "grid.png", [c.caption for c in held], 2)
    assert [v["right"] for v in verdicts] == [True] * (2 * len(held) - 1) + [False]
    script = W.__file__
    done = subprocess.run([sys.executable, script, "judge", str(tmp_path / "grid.png"), "--n", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr  # 1 of 2 right is still half
    assert f"{len(held)} of {len(held)} prompts" in done.stdout and "1/2 right" in done.stdout
    with pytest.raises(ValueError, match="not a grid"):
        W.judge_grid(tmp_path / "grid.png", [c.caption for c in held], 3)
