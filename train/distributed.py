"""torchrun integration: process group, device, DDP/FSDP wrapping, gradient accumulation.

`torchrun --nproc-per-node 8 [--nnodes N --rdzv-endpoint HOST:PORT] -m train.cli run stage1`
sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process (world 1) and no
process group is created.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from core.config import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int  # global rank
    world: int  # number of processes
    local_rank: int  # GPU index on this node
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(timeout_min: int = 30) -> Dist:
    """Read torchrun's environment, pick this rank's device, start the process group if world > 1."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min)
        )
    return Dist(rank, world, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def accum_steps(global_batch: int, world: int, micro_batch: int) -> int:
    """Micro-batches per optimizer step so that world * micro * accum == global batch."""
    per_step = world * micro_batch
    if global_batch % per_step:
        raise ConfigError(
            f"global batch {global_batch} is not a multiple of {world} GPU(s) x micro-batch {micro_batch}; "
            f"choose a micro-batch that divides {global_batch // world if global_batch % world == 0 else global_batch}"
        )
    return global_batch // per_step


def micro_batch(global_batch: int, world: int, micro: int | None) -> int:
    """The per-GPU micro-batch: the configured one, or the global batch split over the GPUs."""
    if micro is not None:
        return micro
    if global_batch % world:
        raise ConfigError(f"global batch {global_batch} does not split over {world} GPUs; set micro_batch_size")
    return global_batch // world


def wrap(model: nn.Module, d: Dist, fsdp: bool, deterministic: bool = False) -> nn.Module:
    """DDP (default) or FSDP2 (`fully_shard` per transformer block, then the root) when world > 1.

    The wrapper is the outermost module: `torch.compile` is applied to the blocks inside it
    beforehand (`model.compile_blocks`), so `no_sync` / `set_requires_gradient_sync` act on the
    wrapper itself. deterministic: DDP sums gradients in rank order (`ordered_sum_hook`)."""
    if d.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if type(module).__name__ in ("DualBlock", "SingleBlock"):
                fully_shard(module)
        return fully_shard(model)
    ids = [d.local_rank] if d.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if deterministic:
        ddp.register_comm_hook(None, ordered_sum_hook)
    return ddp


def ordered_sum_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the mean of a gradient bucket over ranks, summed in rank order.

    An all-reduce adds the ranks' values in an order that depends on where an element sits in the
    bucket (ring/tree chunks), and DDP re-lays its buckets out after each process's first step, so
    a resumed process would add in another order than the uninterrupted one (with > 2 ranks; two
    terms commute). All-gather then a local sum in rank order is layout-independent, at
    world_size/2 times the traffic of an all-reduce (deterministic runs only)."""
    buffer = bucket.buffer()
    world = dist.get_world_size()
    gathered = [torch.empty_like(buffer) for _ in range(world)]
    fut = dist.all_gather(gathered, buffer, async_op=True).get_future()

    def reduce(_: torch.futures.Future) -> torch.Tensor:
        total = gathered[0].clone()
        for part in gathered[1:]:
            total += part
        return buffer.copy_(total.div_(world))

    return fut.then(reduce)


# DDP checks a hook's annotations as objects; this module's are strings (postponed evaluation).
ordered_sum_hook.__annotations__.update(bucket=dist.GradBucket, **{"return": torch.futures.Future[torch.Tensor]})


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module under `torch.compile`'s wrapper (an OptimizedModule keeps it as `_orig_mod`)."""
    return getattr(model, "_orig_mod", model)


@contextlib.contextmanager
def no_sync(model: nn.Module, last: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation.

    Works on DDP and FSDP2 modules, also when they sit under `torch.compile(...)`'s wrapper."""
    model = unwrap_compiled(model)
    if last:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a per-rank scalar over all ranks (for logging)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def full_state_dict(model: nn.Module, raw: nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """Unsharded model weights for saving (every rank must call this under FSDP)."""
    if not fsdp or not dist.is_initialized():
        return raw.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """Optimizer state for saving: unsharded under FSDP (every rank must call), else as is."""
    if not fsdp or not dist.is_initialized():
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_states(model: nn.Module, raw: nn.Module, optimizer: torch.optim.Optimizer, weights: dict,
                optim_state: dict, fsdp: bool) -> None:
    """Load full (unsharded) model weights and optimizer state into a plain or FSDP-wrapped model."""
    if not fsdp or not dist.is_initialized():
        raw.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
