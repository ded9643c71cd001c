"""core.laion: the LAION hash equals mmh3's on any text, aliases resolve the same everywhere."""
from __future__ import annotations

import math

import mmh3
import numpy as np
import pyarrow as pa
import pytest

from core import laion


def _reference(urls, texts):
    return [mmh3.hash64(((u or "") + (t or "")).encode())[0] for u, t in zip(urls, texts)]


def test_hash64_equals_mmh3_for_every_length_and_script() -> None:
    rng = np.random.default_rng(0)
    alphabet = [chr(c) for c in (*range(32, 127), *range(0xC0, 0x17F), *range(0x4E00, 0x4E40), 0x1F600)]
    urls = ["", None, "a", "é" * 7] + ["".join(rng.choice(alphabet, rng.integers(0, 70))) for _ in range(600)]
    texts = [None, "", "b", "\x00\t"] + ["".join(rng.choice(alphabet, rng.integers(0, 200))) for _ in range(600)]
    # lengths 0..48 exactly (every tail length, 0-3 full blocks) and one 1 MB caption
    urls += ["x" * n for n in range(49)] + ["http://h/x.jpg"]
    texts += [""] * 49 + ["w" * 1_000_000]
    want = _reference(urls, texts)
    for batch_rows in (1, 7, 333, laion.BATCH_ROWS):  # batch edges land anywhere
        assert laion.hash64(pa.array(urls, pa.string()), pa.array(texts, pa.string()), batch_rows).to_pylist() == want


def test_hash64_takes_chunked_and_sliced_arrays() -> None:
    urls = pa.chunked_array([["u1", "u2"], ["u3"]])
    texts = pa.array(["t0", "t1", "t2", "t3"]).slice(1)
    assert laion.hash64(urls, texts).to_pylist() == _reference(["u1", "u2", "u3"], ["t1", "t2", "t3"])
    assert laion.row_hash("http://a/b.jpg", "cap") == mmh3.hash64(b"http://a/b.jpgcap")[0]
    assert laion.row_hash(None, None) == mmh3.hash64(b"")[0]
    with pytest.raises(ValueError, match="3 URLs but 2 texts"):
        laion.hash64(urls, texts.slice(1))


def test_aliases_and_finite_scores() -> None:
    assert laion.stored_name(["URL", "AESTHETIC_SCORE"], "aesthetic") == "AESTHETIC_SCORE"
    assert laion.stored_name(["AESTHETIC_SCORE", "aesthetic"], "aesthetic") == "aesthetic"  # preferred name wins
    assert laion.stored_name(["url", "Text"], "URL") == "url" and laion.stored_name(["x"], "URL") is None
    assert laion.score_value({"AESTHETIC_SCORE": 6.5}, "aesthetic") == 6.5
    assert laion.score_value({"aesthetic": math.inf, "AESTHETIC_SCORE": 5}, "aesthetic") == 5.0
    for bad in (math.nan, -math.inf, True, "7", None):
        assert laion.score_value({"pwatermark": bad}, "pwatermark") is None


@pytest.mark.parametrize("n", [0, 1, 65_537])
def test_hash64_sizes(n: int) -> None:
    urls = pa.array([f"https://img{i}.example.com/{i}.jpg" for i in range(n)])
    texts = pa.array([f"a photo number {i}" for i in range(n)])
    got = laion.hash64(urls, texts)
    assert len(got) == n and got.type == pa.int64()
    if n:
        assert got.to_pylist()[-1] == _reference([urls[-1].as_py()], [texts[-1].as_py()])[0]
