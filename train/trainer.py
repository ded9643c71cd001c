"""The training loop. Build everything, then: batch -> step -> log -> checkpoint -> sample.

Run folder (RUN = --run-dir, default runs/<stage>):
    RUN/checkpoints/step_NNNNNNNN/   weights + state (see train/checkpoint.py); resumed automatically
    RUN/samples/step_NNNNNNNN.png    sample grids of the fixed prompts
    RUN/metrics.jsonl, RUN/tb/, RUN/loss.png
    RUN/_config.yaml                 resolved stage config; a different config is refused
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from core.codeshard import Manifest
from core.config import ConfigError, to_dict
from core.progress import make_progress
from core.rundir import RunDir
from core.trainlog import sample_path
from train import checkpoint, distributed
from train.data import Batch, CodeLoader, check_manifest, open_dataset
from train.ema import EMA
from train.masking import apply_cfg_dropout, cfg_drop_mask, cond_value, mask_ratio, mask_tokens, masked_ce, sample_t
from train.metrics import MetricsLog, mfu, throughput
from train.model import MODELS, ModelConfig, build_model, load_without_compression
from train.optim import build_optimizer, build_scheduler
from train.sampler import codes_to_colors, decode_vq, generate, save_grid
from train.stages import StageConfig
from train.text_encoder import TextEncoder


@dataclass
class StepInputs:
    """One micro-batch on the device, text already encoded."""

    codes: torch.Tensor  # (B, h, w) long
    hidden: torch.Tensor  # (B, 77, text_dim) float
    pooled: torch.Tensor  # (B, pooled_dim) float
    micro_conds: torch.Tensor  # (B, 5) float


def model_config(cfg: StageConfig, manifest: Manifest, data_path: str) -> ModelConfig:
    """The stage's model preset, checked against (or, for resolution None, sized from) the shards."""
    if cfg.model not in MODELS:
        raise ConfigError(f"model: unknown preset {cfg.model!r} (known: {', '.join(sorted(MODELS))})")
    base = MODELS[cfg.model]
    if cfg.resolution is None:  # debug: any shards; the codebook comes from their manifest
        base = base.with_codebook(manifest.codebook_size)
    check_manifest(manifest, data_path, cfg.resolution, base.codebook_size)
    return dataclasses.replace(base, downsample=cfg.downsample)


def build_text_encoder(cfg: StageConfig, device: torch.device) -> TextEncoder:
    if cfg.text.tiny:
        return TextEncoder.tiny(cfg.text.tiny_seed).to(device)
    if not Path(cfg.text.checkpoint).exists():
        raise ConfigError(f"text.checkpoint {cfg.text.checkpoint}: not found (a local open_clip ViT-H-14 checkpoint)")
    return TextEncoder.from_checkpoint(cfg.text.checkpoint, device=device)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The masking / CFG-dropout noise of one optimizer step on one rank: a pure function of
    (seed, step, rank), so a resumed run draws exactly what the uninterrupted one drew. It lives
    on the training device, so drawing noise never synchronises host and GPU."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def _to(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    return (t.pin_memory() if pin else t).to(device, non_blocking=pin)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    table = {"bf16": torch.bfloat16, "fp32": None, "auto": torch.bfloat16 if device.type == "cuda" else None}
    return table[precision]


def set_determinism(cfg: StageConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    def __init__(self, cfg: StageConfig, stage: str, run_dir: Path, dist: distributed.Dist):
        self.cfg, self.stage, self.run_dir, self.dist = cfg, stage, run_dir, dist
        self.device = dist.device
        set_determinism(cfg)
        self.dataset = open_dataset(cfg.data)
        self.manifest = self.dataset.manifest
        self.model_cfg = model_config(cfg, self.manifest, cfg.data.path)
        self.grid = tuple(self.manifest.grid)
        self.config_hash = self._open_run_dir()

        self.text = build_text_encoder(cfg, self.device)
        self._check_text_dims()
        self.empty = self.text.empty()  # ((1, 77, D), (1, P)) on the device

        torch.manual_seed(cfg.seed)  # model init
        self.raw = build_model(self.model_cfg)
        self.resume_from = checkpoint.latest(run_dir)
        if cfg.init_from and self.resume_from is None:
            self._init_from(cfg.init_from)
        self.raw.to(self.device)
        self.raw.gradient_checkpointing = cfg.grad_ckpt
        self.model = distributed.wrap(self.raw, dist, cfg.fsdp)

        micro = distributed.micro_batch(cfg.batch_size, dist.world, cfg.micro_batch_size)
        self.accum = distributed.accum_steps(cfg.batch_size, dist.world, micro)
        self.loader = CodeLoader(
            self.dataset, micro, seed=cfg.seed, rank=dist.rank, world=dist.world,
            long_caption_prob=cfg.data.long_caption_prob, default_score=cfg.data.default_score,
        )
        self.optimizer = build_optimizer(self.raw, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps)
        self.ema = EMA(self.raw, cfg.ema) if cfg.ema.enabled else None
        self.autocast = autocast_dtype(cfg.precision, self.device)
        self.step = 0
        if self.resume_from is not None:
            self._resume(self.resume_from)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self.metrics = MetricsLog(run_dir, dist.is_main, self.step, cfg.tensorboard)
        self.vq = self._build_decoder()
        self.flops_per_token = _flops_per_token(self.model_cfg, self.grid, self.empty[0].shape[1])

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        self._say(f"{self.stage}: steps {self.step}->{cfg.steps}, global batch {cfg.batch_size} = "
                  f"{self.dist.world} rank(s) x {self.loader.batch_size} x {self.accum} accumulation, grid {self.grid}")
        window = _Window()
        with make_progress() as progress:
            bar = progress.add_task(f"train {self.stage}", total=cfg.steps, completed=self.step,
                                    visible=self.dist.is_main)
            while self.step < cfg.steps:
                inputs = [self.prepare(self.loader.next_batch()) for _ in range(self.accum)]
                stats = self.train_step(inputs, self.step)
                self.step += 1
                window.add(stats, cfg.batch_size, cfg.batch_size * self.grid[0] * self.grid[1])
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    self.log(window)
                if self.step % cfg.ckpt_every == 0 or last:
                    self.save()
                if cfg.sample.every and (self.step % cfg.sample.every == 0 or last):
                    self.sample_grid()
                progress.update(bar, completed=self.step)
        self.metrics.plot()
        self.metrics.close()
        return {"step": self.step, "run_dir": str(self.run_dir), "checkpoint": str(checkpoint.latest(self.run_dir))}

    def prepare(self, batch: Batch) -> StepInputs:
        """Move a batch to the device and encode its captions with the frozen text encoder."""
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            hidden, pooled = self.text.encode(batch.captions)
        pin = self.device.type == "cuda"  # pinned host memory makes the copies truly asynchronous
        return StepInputs(
            codes=_to(batch.codes, self.device, pin),
            hidden=hidden.float(), pooled=pooled.float(),
            micro_conds=_to(batch.micro_conds, self.device, pin),
        )

    def train_step(self, inputs: list[StepInputs], step: int) -> dict[str, torch.Tensor | float]:
        """One optimizer step over `accum` micro-batches. Returns device tensors (no host sync)."""
        gen = step_generator(self.cfg.seed, step, self.dist.rank, self.device)
        total = torch.zeros((), device=self.device)
        for i, inp in enumerate(inputs):
            with distributed.no_sync(self.model, last=i == len(inputs) - 1):
                loss = self.loss(inp, gen) / len(inputs)
                loss.backward()
            total += loss.detach()
        grad_norm = self._clip()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw, step)
        return {"loss": total, "grad_norm": grad_norm, "lr": lr}

    def loss(self, inp: StepInputs, gen: torch.Generator) -> torch.Tensor:
        """Mask, drop captions for CFG, predict, cross-entropy on the masked tokens."""
        b = inp.codes.shape[0]
        t = sample_t(b, gen)
        masked, mask = mask_tokens(inp.codes, t, self.model_cfg.mask_token_id, gen)
        drop = cfg_drop_mask(b, self.cfg.cfg_dropout, gen)
        hidden, pooled = apply_cfg_dropout(inp.hidden, inp.pooled, *self.empty, drop)
        timestep = cond_value(mask_ratio(mask))
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            logits = self.model(masked, hidden, pooled, inp.micro_conds, timestep)  # (B, L, K)
        return masked_ce(logits, inp.codes, mask)

    def log(self, window: "_Window") -> None:
        record = window.flush(self.device)
        record["mfu"] = mfu(record["tokens_per_s"], self.flops_per_token, _peak_flops(self.device, self.dist.world))
        record.update(step=self.step, epoch=self.loader.epoch)
        self.metrics.log(record)

    def save(self) -> None:
        weights = distributed.full_state_dict(self.model, self.raw, self.cfg.fsdp)
        optim_state = distributed.optimizer_state(self.model, self.optimizer, self.cfg.fsdp)
        if not self.dist.is_main:
            return
        state = {
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "ema_updates": self.ema.updates if self.ema else 0,
            "cursor": self.loader.state_dict(),
            "rng": checkpoint.rng_state(),
            "config_hash": self.config_hash,
        }
        checkpoint.save(self.run_dir, self.step, weights, state, self._meta(),
                        ema_weights=self.ema.state_dict() if self.ema else None, keep=self.cfg.keep_last)

    @torch.no_grad()
    def sample_grid(self) -> Path | None:
        """Codes for the fixed prompts with the current weights, decoded to RUN/samples/step_N.png."""
        s = self.cfg.sample
        self.raw.eval()
        codes = generate(self.raw, self.text, s.prompts, self.grid, self.manifest.resolution,
                         steps=s.steps, cfg=s.cfg, negative_prompt=s.negative_prompt, seed=s.seed)
        self.raw.train()
        if not self.dist.is_main:
            return None
        images = decode_vq(self.vq, codes) if self.vq is not None else codes_to_colors(codes, self.model_cfg.codebook_size)
        return save_grid(images, sample_path(self.run_dir, self.step))

    # ---------------------------------------------------------------- set-up helpers
    def _open_run_dir(self) -> str:
        """Write (or check) RUN/_config.yaml on the main rank (a different config is refused);
        every rank returns the config hash. Only rank 0 touches the folder (RunDir.open also
        clears temp files, which must not race with rank 0's writes)."""
        identity = {"stage": to_dict(self.cfg), "data": {"tokenizer_sha256": self.manifest.tokenizer.sha256,
                                                       "rows": self.manifest.num_rows, "grid": list(self.grid)}}
        if self.dist.is_main:
            RunDir.open(self.run_dir, f"train.{self.stage}", identity)
            checkpoint.remove_partial(self.run_dir)
        distributed.barrier()
        return yaml.safe_load((self.run_dir / "_config.yaml").read_text())["hash"]

    def _check_text_dims(self) -> None:
        have = (self.text.hidden_dim, self.text.pooled_dim)
        want = (self.model_cfg.text_dim, self.model_cfg.pooled_dim)
        if have != want:
            raise ConfigError(f"text encoder gives hidden/pooled widths {have}, model {self.cfg.model!r} expects {want}")

    def _init_from(self, source: str) -> None:
        """Start from the previous stage's final weights; stage3 keeps its new compression layers."""
        ckpt = checkpoint.resolve(source)
        weights = checkpoint.load_weights(ckpt, ema=self.cfg.init_ema)
        adds_compression = self.model_cfg.downsample and not any(k.startswith("down_block.") for k in weights)
        if adds_compression:
            fresh = load_without_compression(self.raw, weights)
            self._say(f"initialised from {ckpt}; {len(fresh)} compression tensors start fresh")
        else:
            self.raw.load_state_dict(weights, strict=True)
            self._say(f"initialised from {ckpt}")

    def _resume(self, ckpt: Path) -> None:
        state = checkpoint.load_state(ckpt)
        if state["config_hash"] != self.config_hash:
            raise checkpoint.CheckpointError(f"{ckpt} was written by another config (hash {state['config_hash']})")
        distributed.load_states(self.model, self.raw, self.optimizer, checkpoint.load_weights(ckpt),
                                state["optimizer"], self.cfg.fsdp)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(checkpoint.load_weights(ckpt, ema=True), state["ema_updates"])
        self.loader.load_state_dict(dict(state["cursor"], rank=self.dist.rank))
        checkpoint.set_rng_state(state["rng"])
        self.step = int(state["step"])
        self._say(f"resumed from {ckpt} at step {self.step}")

    def _build_decoder(self):
        """The VQ decoder for sample grids (None: false-colour code maps), loaded up front so a
        missing VQ fails at start-up, not hours into the run."""
        s = self.cfg.sample
        if not s.every or s.decode == "codes":
            return None
        path = s.vq or self.manifest.tokenizer.path
        if s.decode == "auto" and not (Path(path) / "config.json").is_file():
            self._say(f"sample grids: no VQ at {path}, writing false-colour code maps (set sample.vq to decode)")
            return None
        from core.vq import load_vq

        return load_vq(path, device=self.device)

    def _meta(self) -> dict[str, Any]:
        """What `train sample` needs to rebuild model, text encoder and decoder from a checkpoint."""
        return {
            "stage": self.stage, "model_preset": self.cfg.model, "model": dataclasses.asdict(self.model_cfg),
            "text": to_dict(self.cfg.text), "vq": self.cfg.sample.vq or self.manifest.tokenizer.path,
            "tokenizer_sha256": self.manifest.tokenizer.sha256, "grid": list(self.grid),
            "resolution": self.manifest.resolution, "data": self.cfg.data.path, "config_hash": self.config_hash,
        }

    def _clip(self) -> torch.Tensor:
        clip = self.cfg.optim.grad_clip or float("inf")  # inf: measure the norm, clip nothing
        norm = torch.nn.utils.clip_grad_norm_(self.raw.parameters(), clip)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def _say(self, text: str) -> None:
        if self.dist.is_main:
            print(text, flush=True)


class _Window:
    """Sums of the step statistics between two log records (device tensors until flushed)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.loss, self.grad_norm, self.steps, self.samples, self.tokens = 0.0, 0.0, 0, 0, 0
        self.lr, self.start = 0.0, time.perf_counter()

    def add(self, stats: dict[str, Any], samples: int, tokens: int) -> None:
        self.loss = self.loss + stats["loss"]
        self.grad_norm = self.grad_norm + stats["grad_norm"]
        self.lr, self.steps = stats["lr"], self.steps + 1
        self.samples, self.tokens = self.samples + samples, self.tokens + tokens

    def flush(self, device: torch.device) -> dict[str, Any]:
        """Mean loss (over steps and ranks), mean grad norm, last lr, throughput; then reset."""
        loss = distributed.mean_over_ranks(float(self.loss) / self.steps, device)
        record = {"loss": loss, "grad_norm": float(self.grad_norm) / self.steps, "lr": self.lr}
        record.update(throughput(self.samples, self.tokens, time.perf_counter() - self.start))
        self._reset()
        return record


def _flops_per_token(cfg: ModelConfig, grid: tuple[int, int], text_len: int) -> float:
    from train.flops import flops_per_token

    return float(flops_per_token(cfg, grid, text_len))


def _peak_flops(device: torch.device, world: int) -> float | None:
    """Dense bf16 peak FLOP/s of all devices together (None on CPU or an unknown GPU: no MFU)."""
    if device.type != "cuda":
        return None
    from train.flops import GPU_PEAK_TFLOPS

    name = torch.cuda.get_device_name(device).lower()
    peak = next((tf for key, tf in GPU_PEAK_TFLOPS.items() if key in name), None)
    return peak * 1e12 * world if peak else None


def run(cfg: StageConfig, stage: str, run_dir: str | os.PathLike) -> dict[str, Any]:
    """Train `stage` into `run_dir` (resuming from its latest checkpoint); torchrun-aware."""
    dist = distributed.init()
    try:
        return Trainer(cfg, stage, Path(run_dir), dist).train()
    finally:
        distributed.shutdown()
