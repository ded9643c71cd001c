import random

import numpy as np
import torch

from train import checkpoint as ckpt


def _save(run, step, keep=2, ema=None):
    weights = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    state = {"optimizer": {"x": torch.zeros(1)}, "cursor": {"epoch": 1, "position": 4}, "rng": ckpt.rng_state()}
    return ckpt.save(run, step, weights, state, {"model": {"hidden": 4}}, ema_weights=ema, keep=keep)


def test_save_load_latest_and_prune(tmp_path):
    assert ckpt.latest(tmp_path) is None
    for step in (10, 20, 30):
        _save(tmp_path, step, ema={"a": torch.zeros(2)} if step == 30 else None)
    assert ckpt.all_steps(tmp_path) == [20, 30]
    last = ckpt.latest(tmp_path)
    assert last.name == "step_00000030" and ckpt.resolve(tmp_path) == last
    assert torch.equal(ckpt.load_weights(last)["a"], torch.arange(6.0).view(2, 3))
    assert torch.equal(ckpt.load_weights(last, ema=True)["a"], torch.zeros(2))
    state = ckpt.load_state(last)
    assert state["step"] == 30 and state["cursor"] == {"epoch": 1, "position": 4}
    assert ckpt.load_meta(last)["model"] == {"hidden": 4}


def test_partial_checkpoint_is_ignored(tmp_path):
    _save(tmp_path, 5)
    broken = ckpt.step_dir(tmp_path, 9)
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")  # killed mid-write (no state.pt)
    (tmp_path / "checkpoints" / "_tmp.abc.step_00000012").mkdir()
    assert ckpt.latest(tmp_path).name == "step_00000005"
    assert ckpt.remove_partial(tmp_path) == 1 and not (tmp_path / "checkpoints" / "_tmp.abc.step_00000012").exists()


def test_rng_state_roundtrip(tmp_path):
    _save(tmp_path, 1)
    want = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.set_rng_state(ckpt.load_state(ckpt.latest(tmp_path))["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_metrics_survive_a_cut_last_line_and_truncate_on_resume(tmp_path):
    from train.metrics import METRICS, MetricsLog, read_records

    (tmp_path / METRICS).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_records(tmp_path)] == [1, 2]
    log = MetricsLog(tmp_path, enabled=True, resume_step=1, tensorboard=False)
    log.log({"step": 2, "loss": 1.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_records(tmp_path)] == [(1, 2.0), (2, 1.0)]
    assert log.plot().is_file()


def test_damaged_checkpoint_files_are_named(tmp_path):
    """A cut or emptied file gives one CheckpointError naming it (was: a safetensors or JSON
    traceback, or click's bare "Aborted." for the EOFError of an empty state.pt)."""
    import pytest

    last = _save(tmp_path, 7, ema={"a": torch.zeros(2)})
    (last / "ema.safetensors").write_bytes((last / "ema.safetensors").read_bytes()[:20])
    (last / "state.pt").write_bytes(b"")
    (last / "meta.json").write_text('{"stage":')
    for load, name in ((lambda: ckpt.load_weights(last, ema=True), "ema.safetensors"),
                       (lambda: ckpt.load_state(last), "state.pt"), (lambda: ckpt.load_meta(last), "meta.json")):
        with pytest.raises(ckpt.CheckpointError, match=rf"{name}: unreadable .*remove its folder"):
            load()
    (last / "ema.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="no ema.safetensors .*or the file was removed"):
        ckpt.load_weights(last, ema=True)
