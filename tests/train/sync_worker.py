"""Worker of test_grad_sync.py, run under torchrun (2 ranks, gloo, CPU): counts gradient
reductions per accumulation cycle of the real Trainer (DDP, DDP with compiled blocks, FSDP2,
FSDP2 with compiled blocks) and of `no_sync` on a torch.compile(DDP(...)) wrapper.

    python -m torch.distributed.run --nproc-per-node 2 tests/train/sync_worker.py CODES OUT_DIR

Rank 0 prints one JSON line: {mode: {"rounds": [reduction rounds of each cycle's last
micro-batch], "early": reductions during the other micro-batches, "compiled": bool}}. A DDP round
ends with the bucket DDP flags `is_last()`; an FSDP2 round is one reduce-scatter per sharded module.
Also "ordered_sum_rel_diff": deterministic mode's DDP hook against DDP's own all-reduce.
No `from __future__ import annotations`: DDP checks a comm hook's annotations as objects.
"""
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from core.config import REPO_PIPELINES, parse_sets
from train import distributed
from train.model import MODELS, build_model
from train.stages import load_stage
from train.trainer import Trainer

STEPS, ACCUM = 2, 4
COUNT = {"n": 0.0, "units": 1}  # reduction rounds so far (fractions while an FSDP2 round is under way)
SEEN = {"last": [], "early": 0.0}
ORIGINAL_NO_SYNC = distributed.no_sync


def counting_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's own all-reduce hook; a round is counted at the bucket DDP flags as the last one."""
    COUNT["n"] += 1.0 if bucket.is_last() else 0.0
    return default_hooks.allreduce_hook(dist.group.WORLD, bucket)


@contextlib.contextmanager
def counting_no_sync(model, last):
    """The trainer's no_sync, noting the rounds run inside each micro-batch's forward/backward."""
    before = COUNT["n"]
    with ORIGINAL_NO_SYNC(model, last):
        yield
    if last:
        SEEN["last"].append(COUNT["n"] - before)
    else:
        SEEN["early"] += COUNT["n"] - before


def count_reduce_scatters() -> None:
    """FSDP2 reduces gradients with dist.reduce_scatter_single (torch >= 2.12) or
    dist.reduce_scatter_tensor, looked up at call time: count both, 1/units of a round each."""
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        if hasattr(dist, name):
            original = getattr(dist, name)

            def counted(*args, _original=original, **kwargs):
                COUNT["n"] += 1.0 / COUNT["units"]
                return _original(*args, **kwargs)

            setattr(dist, name, counted)


def run_trainer(codes: str, out: Path, mode: str, d: distributed.Dist) -> dict:
    fsdp, compiled = mode.startswith("fsdp"), mode.endswith("compiled")
    sets = ["threads=1", "tensorboard=false", "sample.every=0", f"steps={STEPS}", "log_every=1",
            f"ckpt_every={STEPS}", f"batch_size={2 * ACCUM}", "micro_batch_size=1", f"data.path={codes}",
            f"fsdp={str(fsdp).lower()}", f"compile={str(compiled).lower()}", "compile_backend=aot_eager",
            "ema.enabled=false"]  # FSDP refuses EMA (the debug stage keeps one)
    trainer = Trainer(load_stage("debug", REPO_PIPELINES, parse_sets(sets)), "debug", out / mode, d)
    assert trainer.accum == ACCUM
    if fsdp:
        COUNT["units"] = sum(hasattr(m, "set_requires_gradient_sync") for m in trainer.model.modules())
    else:
        trainer.model.register_comm_hook(None, counting_hook)
    SEEN.update(last=[], early=0.0)
    trainer.train()
    return {"rounds": [round(r, 6) for r in SEEN["last"]], "early": SEEN["early"], "units": COUNT["units"],
            "compiled": hasattr(trainer.raw.transformer_blocks[0].forward, "_torchdynamo_orig_callable")}


def run_compiled_wrapper(d: distributed.Dist) -> dict:
    """torch.compile(DDP(model)): `no_sync` must reach the DDP module under the compile wrapper."""
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(build_model(MODELS["debug"]))
    ddp.register_comm_hook(None, counting_hook)
    model = torch.compile(ddp, backend="aot_eager")
    assert not isinstance(model, torch.nn.parallel.DistributedDataParallel)  # what the old check missed
    g = torch.Generator().manual_seed(d.rank)
    inputs = (torch.randint(0, 64, (1, 4, 4), generator=g), torch.randn(1, 7, 64, generator=g),
              torch.randn(1, 64, generator=g), torch.rand(1, 5, generator=g) * 100, torch.rand(1, generator=g))
    SEEN.update(last=[], early=0.0)
    for _ in range(STEPS):
        for i in range(ACCUM):
            with distributed.no_sync(model, last=i == ACCUM - 1):
                model(*inputs).float().mean().backward()
    return {"rounds": SEEN["last"], "early": SEEN["early"], "compiled": True}


def check_ordered_sum(d: distributed.Dist) -> float:
    """Largest gradient difference between DDP's all-reduce and `ordered_sum_hook` (deterministic
    mode's rank-ordered mean) after the same synced backward on each rank's own batch."""
    grads = []
    for hook in (None, distributed.ordered_sum_hook):
        torch.manual_seed(0)
        ddp = torch.nn.parallel.DistributedDataParallel(build_model(MODELS["debug"]))
        if hook is not None:
            ddp.register_comm_hook(None, hook)
        g = torch.Generator().manual_seed(d.rank)
        ddp(torch.randint(0, 64, (2, 4, 4), generator=g), torch.randn(2, 7, 64, generator=g),
            torch.randn(2, 64, generator=g), torch.rand(2, 5, generator=g) * 100,
            torch.rand(2, generator=g)).float().square().mean().backward()
        grads.append([p.grad.clone() for p in ddp.parameters()])
    return max(float((a - b).abs().max() / (a.abs().max() + 1e-12)) for a, b in zip(*grads))


def main() -> None:
    codes, out = sys.argv[1], Path(sys.argv[2])
    d = distributed.init()
    distributed.no_sync = counting_no_sync  # the trainer looks it up at call time
    results = {mode: run_trainer(codes, out, mode, d) for mode in ("ddp", "ddp_compiled")}
    results["compile(ddp)"] = run_compiled_wrapper(d)
    count_reduce_scatters()
    results.update({mode: run_trainer(codes, out, mode, d) for mode in ("fsdp", "fsdp_compiled")})
    results["ordered_sum_rel_diff"] = check_ordered_sum(d)
    if d.is_main:
        print(json.dumps(results), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
