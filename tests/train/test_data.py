import numpy as np
import pytest
import torch

from core.codeshard import CodeDataset, read_manifest
from train.data import CodeLoader, DataMismatchError, check_manifest, pick_captions


def _loader(folder, **kw):
    args = dict(batch_size=4, seed=3)
    args.update(kw)
    return CodeLoader(CodeDataset(folder), **args)


def test_batch_contents_match_rows(code_folder):
    loader = _loader(code_folder)
    batch = loader.next_batch()
    ds = loader.dataset
    assert batch.codes.shape == (4, 4, 4) and batch.codes.dtype == torch.long
    for i, idx in enumerate(batch.indices):
        row = ds.row(int(idx))
        assert np.array_equal(batch.codes[i].flatten().numpy(), row["codes"])
        assert batch.captions[i] == row["caption"]  # long_caption_prob = 0
        score = 6.0 if row["aesthetic"] is None else row["aesthetic"]
        expected = [row["orig_w"], row["orig_h"], row["crop_top"], row["crop_left"], score]
        assert torch.allclose(batch.micro_conds[i], torch.tensor(expected, dtype=torch.float32))


def test_epoch_is_a_permutation_and_reseeded(code_folder):
    loader = _loader(code_folder, batch_size=1)
    first = [int(loader.next_batch().indices[0]) for _ in range(17)]
    second = [int(loader.next_batch().indices[0]) for _ in range(17)]
    assert sorted(first) == list(range(17)) and sorted(second) == list(range(17))
    assert first != second and loader.epoch == 1


def test_ranks_split_equally_and_disjointly(code_folder):
    parts = [_loader(code_folder, batch_size=2, rank=r, world=3).epoch_order(0) for r in range(3)]
    assert [len(p) for p in parts] == [5, 5, 5]  # 17 // 3, tail dropped so counts are equal
    flat = np.concatenate(parts)
    assert len(set(flat.tolist())) == 15
    perm = np.random.default_rng([3, 0]).permutation(17)
    assert np.array_equal(parts[1], perm[1::3][:5])


def test_long_caption_probability(code_folder):
    loader = _loader(code_folder, batch_size=8, long_caption_prob=1.0)
    batch = loader.next_batch()
    for i, idx in zip(range(8), batch.indices):
        want = "a long description" if idx % 2 == 0 else "a photo number"
        assert batch.captions[i].startswith(want)
        assert batch.long[i] == (idx % 2 == 0)  # rows without a long caption fall back and are not counted
    draws = np.random.default_rng(0).random(20000)
    picked, long = pick_captions(["c"] * 20000, ["l"] * 20000, draws, 0.3)
    assert abs(picked.count("l") / 20000 - 0.3) < 0.015 and long.sum() == picked.count("l")
    picked, long = pick_captions(["c", "c", None], ["l", None, ""], np.zeros(3), 0.5)
    assert picked == ["l", "c", ""] and long.tolist() == [True, False, False]


def test_cursor_resume_gives_the_same_batches(code_folder):
    """torchtitan-style: advance, save the cursor, rebuild, load, compare the next batches."""
    loader = _loader(code_folder, batch_size=3, long_caption_prob=0.5)
    for _ in range(7):  # crosses an epoch boundary (5 batches per epoch)
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(6)]
    fresh = _loader(code_folder, batch_size=3, long_caption_prob=0.5)
    fresh.load_state_dict(state)
    for want, got in zip(expected, (fresh.next_batch() for _ in range(6))):
        assert np.array_equal(want.indices, got.indices)
        assert torch.equal(want.codes, got.codes) and want.captions == got.captions
        assert torch.equal(want.micro_conds, got.micro_conds)
    with pytest.raises(ValueError, match="seed"):
        _loader(code_folder, seed=4).load_state_dict(state)


def test_too_little_data_and_mismatch_are_refused(code_folder):
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        _loader(code_folder, batch_size=9, world=2)
    manifest = read_manifest(code_folder)
    check_manifest(manifest, "x", None, None)
    with pytest.raises(DataMismatchError, match="64 px, this stage trains at 256 px"):
        check_manifest(manifest, "x", 256, None)
    with pytest.raises(DataMismatchError, match="16-entry codebook"):
        check_manifest(manifest, "x", 64, 8192)


def test_typical_micro_conds_are_medians_of_the_data(code_folder):
    from core.codeshard import CodeDataset
    from train.data import typical_micro_conds

    ds = CodeDataset(code_folder)  # 17 rows i = 0..16 (see conftest.write_code_folder)
    ids = np.arange(17)
    scores = [5.0 + i / 100 for i in ids if i % 3]  # every third score is null: left out
    want = [float(np.median(100 + ids)), float(np.median(200 + ids)), float(np.median(ids % 3)),
            float(np.median(ids % 5)), float(np.median(np.array(scores, dtype=np.float32)))]
    assert typical_micro_conds(ds, default_score=6.0) == pytest.approx(want, rel=1e-6)
    sub = typical_micro_conds(ds, default_score=6.0, max_rows=3)  # rows 0, 8, 16
    assert sub[:2] == [108.0, 208.0]


def test_typical_score_without_any_score_is_the_default(tmp_path, make_code_folder):
    import pyarrow as pa

    from core.codeshard import CodeDataset, read_manifest, write_manifest, write_shard
    from train.data import typical_micro_conds

    folder = make_code_folder(tmp_path / "c", rows_per_shard=(4,))
    shard = CodeDataset(folder).shards[0].table
    table = shard.set_column(shard.schema.get_field_index("aesthetic"), "aesthetic", pa.nulls(4, pa.float32()))
    manifest = read_manifest(folder)
    manifest.shards[0] = write_shard(folder / "00000.arrow", table)
    write_manifest(folder, manifest)
    assert typical_micro_conds(CodeDataset(folder), default_score=6.5)[4] == 6.5
