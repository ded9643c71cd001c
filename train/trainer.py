"""The training loop. Build everything, then: batch -> step -> log -> checkpoint -> sample.

Run folder (RUN = --run-dir, default runs/<stage>):
    RUN/checkpoints/step_NNNNNNNN/   weights + state + meta (see train/checkpoint.py); resumed automatically
    RUN/samples/step_NNNNNNNN.png    sample grids of the fixed prompts
    RUN/metrics.jsonl, RUN/tb/, RUN/loss.png
    RUN/_config.yaml                 resolved stage config; a different config is refused
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from core.codeshard import Manifest
from core.config import ConfigError, settings, to_dict
from core.errors import UserError
from core.progress import make_progress
from core.rundir import RunDir
from core.trainlog import sample_path
from train import checkpoint, distributed, release
from train.convention import CONVENTIONS, Convention
from train.data import Batch, CodeLoader, check_manifest, open_dataset, typical_micro_conds
from train.ema import EMA
from train.kernels import sdpa_choice
from train.masking import apply_cfg_dropout, cfg_drop_mask, mask_rate, mask_ratio, mask_tokens, masked_ce, sample_t
from train.metrics import MetricsLog, mfu, throughput
from train.model import MODELS, ModelConfig, build_model, compile_blocks, load_without_compression
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
    long: int  # how many of the B captions are long captions


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
    if not (cfg.text.tiny or cfg.text.random) and not Path(cfg.text.checkpoint).exists():
        raise ConfigError(f"text.checkpoint {cfg.text.checkpoint}: not found (a local open_clip ViT-H-14 checkpoint)")
    return TextEncoder.from_config(cfg.text, device)


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
    """CPU threads, and with `deterministic: true` every switch that makes a CUDA run repeat
    itself bit for bit (see docs/train.md "Resume exactness"): cuBLAS's fixed workspace (read
    when cuBLAS starts, so before the first matmul), deterministic kernels or an error where
    none exists, cuDNN without benchmarking, SDPA limited to FlashAttention (its backward then
    runs the deterministic variant; cuDNN attention has none) and the math fallback, and
    Inductor's deterministic mode (no autotuning by timing, which can pick other kernels)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "deterministic"):  # older torch has no such switch (nor the autotuning it stops)
        inductor_config.deterministic = True  # recent torch also sets it through use_deterministic_algorithms


class TrainingDiverged(UserError):
    """The loss went non-finite: stopped before a NaN is logged or checkpointed."""


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

        self.resume_from = checkpoint.latest(run_dir)
        self.convention = self._resolve_convention()
        self.autocast = autocast_dtype(cfg.precision, self.device)
        self.text = build_text_encoder(cfg, self.device).configure(self.convention.pad_token_id, self.autocast)
        self._check_text_dims()
        self.empty = self.text.empty()  # ((1, 77, D), (1, P)) on the device, same padding and precision
        self.sample_micro = typical_micro_conds(self.dataset, cfg.data.default_score)

        torch.manual_seed(cfg.seed)  # model init
        self.raw = build_model(self.model_cfg)
        if cfg.init_from and self.resume_from is None:
            self._init_from(cfg.init_from)
        self.raw.to(self.device)
        self.raw.gradient_checkpointing = cfg.grad_ckpt
        if cfg.compile:  # the blocks inside, before DDP/FSDP2 wraps the model (see compile_blocks)
            compile_blocks(self.raw, cfg.compile_backend)
        self.model = distributed.wrap(self.raw, dist, cfg.fsdp, cfg.deterministic)

        micro = distributed.micro_batch(cfg.batch_size, dist.world, cfg.micro_batch_size)
        self.accum = distributed.accum_steps(cfg.batch_size, dist.world, micro)
        self.loader = CodeLoader(
            self.dataset, micro, seed=cfg.seed, rank=dist.rank, world=dist.world,
            long_caption_prob=cfg.data.long_caption_prob, default_score=cfg.data.default_score,
        )
        self.optimizer = build_optimizer(self.raw, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.steps)
        self.ema = EMA(self.raw, cfg.ema) if cfg.ema.enabled else None
        self.step = 0
        if self.resume_from is not None:
            self._resume(self.resume_from)
        self.metrics = MetricsLog(run_dir, dist.is_main, self.step, cfg.tensorboard)
        self.vq = self._build_decoder()
        self.flops_per_token = _flops_per_token(self.model_cfg, self.grid, self.empty[0].shape[1])

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        self._say(f"{self.stage}: steps {self.step}->{cfg.steps}, global batch {cfg.batch_size} = "
                  f"{self.dist.world} rank(s) x {self.loader.batch_size} x {self.accum} accumulation, grid {self.grid}")
        self._say(f"convention {self.convention.name}, precision {self._precision()}, attention "
                  f"{self._attention_kernel()}, long captions p={cfg.data.long_caption_prob}, "
                  f"sample micro-conditions {self.sample_micro} (data medians)")
        window = _Window()
        with make_progress() as progress:
            bar = progress.add_task(f"train {self.stage}", total=cfg.steps, completed=self.step,
                                    visible=self.dist.is_main)
            while self.step < cfg.steps:
                inputs = [self.prepare(self.loader.next_batch()) for _ in range(self.accum)]
                stats = self.train_step(inputs, self.step)
                self.step += 1
                window.add(stats, cfg.batch_size, cfg.batch_size * self.grid[0] * self.grid[1],
                           long=sum(inp.long for inp in inputs), local=len(inputs) * self.loader.batch_size)
                last = self.step == cfg.steps
                if self.step % cfg.log_every == 0 or last:
                    self.log(window)
                if self.step % cfg.ckpt_every == 0 or last:
                    self.save()
                if cfg.sample.every and (self.step % cfg.sample.every == 0 or last):
                    self.sample_grid()
                progress.update(bar, completed=self.step)
        # A run killed after its last checkpoint but before its last grid: the rerun draws it.
        if cfg.sample.every and self.step == cfg.steps:
            missing = self.dist.is_main and not sample_path(self.run_dir, self.step).is_file()
            if distributed.mean_over_ranks(float(missing), self.device) > 0:  # every rank samples, or none
                self.sample_grid()
        self.metrics.plot()
        self.metrics.close()
        return {"step": self.step, "run_dir": str(self.run_dir), "checkpoint": str(checkpoint.latest(self.run_dir))}

    def prepare(self, batch: Batch) -> StepInputs:
        """Move a batch to the device and encode its captions with the frozen text encoder (in the
        run's precision and padding, like the empty prompt and the sample grid's prompts)."""
        hidden, pooled = self.text.encode(batch.captions)
        pin = self.device.type == "cuda"  # pinned host memory makes the copies truly asynchronous
        return StepInputs(
            codes=_to(batch.codes, self.device, pin), hidden=hidden, pooled=pooled,
            micro_conds=_to(batch.micro_conds, self.device, pin), long=int(batch.long.sum()),
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
        timestep = self.convention.train_timestep(mask_ratio(mask), mask_rate(t), self.autocast or torch.float32)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            logits = self.model(masked, hidden, pooled, inp.micro_conds, timestep)  # (B, L, K)
        return masked_ce(logits, inp.codes, mask)

    def log(self, window: "_Window") -> None:
        first = self.step - window.steps + 1
        record = window.flush(self.device)
        if not math.isfinite(record["loss"]):  # same value on every rank: all stop together, nothing saved
            last = checkpoint.latest(self.run_dir)
            raise TrainingDiverged(
                f"{self.run_dir}: the loss is {record['loss']} over steps {first}-{self.step}: the run diverged "
                f"(optim.lr {self.cfg.optim.lr}, optim.grad_clip {self.cfg.optim.grad_clip}); "
                + (f"its last checkpoint is {last.name}. " if last else "it has no checkpoint. ")
                + "Train into a new --run-dir with a lower optim.lr (and grad_clip on)")
        record["mfu"] = mfu(record["tokens_per_s"], self.flops_per_token, _peak_flops(self.device, self.dist.world))
        record.update(step=self.step, epoch=self.loader.epoch, long_caption_prob=self.cfg.data.long_caption_prob)
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
        """Codes for the fixed prompts with the current weights, decoded to RUN/samples/step_N.png.
        Run eagerly: a grid every ~1000 steps would otherwise compile inference graphs of its own
        batch size (tens of seconds per block class) to save a fraction of that."""
        s = self.cfg.sample
        self.raw.eval()
        with torch.compiler.set_stance("force_eager"):
            codes = generate(self.raw, self.text, s.prompts, self.grid, self.sample_micro, steps=s.steps, cfg=s.cfg,
                             negative_prompt=s.negative_prompt, seed=s.seed, convention=self.convention,
                             autocast=self.autocast)
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
        # Identity: what decides the weights step by step. Not in it: execution settings (threads,
        # micro-batch, checkpoints kept, ...), `steps` (a rerun with more extends a finished run;
        # the lr schedule then runs to the new end), and how the data folder is spelled or where
        # it lies (the data is named by its manifest: tokenizer, rows, grid, each shard's sha256).
        stage = {k: v for k, v in settings(self.cfg).items() if k != "steps"}
        stage["data"] = {k: v for k, v in settings(self.cfg.data).items() if k != "path"}
        identity = {"stage": stage, "data": {"tokenizer_sha256": self.manifest.tokenizer.sha256,
                                             "rows": self.manifest.num_rows, "grid": list(self.grid),
                                             "shards": shards_digest(self.manifest)}}
        info = {"steps": self.cfg.steps, "data_path": str(self.cfg.data.path)}
        if self.dist.is_main:  # deletes only its own temps; a folder without a checkpoint holds nothing yet
            RunDir.open(self.run_dir, f"train.{self.stage}", identity, own_folder=False,
                        holds_output=lambda p: bool(checkpoint.all_steps(p)), info=info)
            checkpoint.remove_partial(self.run_dir)
        distributed.barrier()
        return yaml.safe_load((self.run_dir / "_config.yaml").read_text())["hash"]

    def _check_text_dims(self) -> None:
        have = (self.text.hidden_dim, self.text.pooled_dim)
        want = (self.model_cfg.text_dim, self.model_cfg.pooled_dim)
        if have != want:
            raise ConfigError(f"text encoder gives hidden/pooled widths {have}, model {self.cfg.model!r} expects {want}")

    def _init_from(self, source: str) -> None:
        """Start from the previous stage's final weights (or a Meissonic release folder: fine-tuning
        it); stage3 keeps its new compression layers."""
        if release.is_release(source):
            weights, what = release.transformer_weights(source), f"the Meissonic release {source}"
        else:
            ckpt = checkpoint.resolve(source)
            weights, what = checkpoint.load_weights(ckpt, ema=self.cfg.init_ema), str(ckpt)
        has_compression = any(k.startswith("down_block.") for k in weights)
        if has_compression and not self.model_cfg.downsample:
            raise ConfigError(f"{what} has the 2x2 compression layers (a 1024-px model): train it with "
                              f"downsample: true on 1024-px shards")
        if self.model_cfg.downsample and not has_compression:
            fresh = load_without_compression(self.raw, weights)
            self._say(f"initialised from {what}; {len(fresh)} compression tensors start fresh")
        else:
            self.raw.load_state_dict(weights, strict=True)
            self._say(f"initialised from {what}")

    def _resolve_convention(self) -> Convention:
        """The run's convention: its own checkpoints' when resuming, else that of the weights it
        starts from (a release: "meissonic"; an earlier stage: what that stage recorded), else
        this project's. A `convention` set in the config must agree."""
        if self.resume_from is not None:
            found, why = checkpoint.load_meta(self.resume_from).get("convention", "tessera"), str(self.resume_from)
        elif self.cfg.init_from and release.is_release(self.cfg.init_from):
            found, why = "meissonic", f"the release {self.cfg.init_from}"
        elif self.cfg.init_from:
            ckpt = checkpoint.resolve(self.cfg.init_from)
            found, why = checkpoint.load_meta(ckpt).get("convention", "tessera"), str(ckpt)
        else:
            found, why = "tessera", "weights trained from scratch"
        if self.cfg.convention not in ("auto", found):
            raise ConfigError(f"convention {self.cfg.convention!r} contradicts {why}, which uses {found!r}: "
                              f"a model only works with the inputs it was trained on (set convention: auto)")
        return CONVENTIONS[found]

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
            "convention": self.convention.name, "precision": self._precision(),
            "sample_micro_conds": self.sample_micro,
            "sample_cfg": self.cfg.sample.cfg,  # `train sample`'s guidance scale unless --cfg is given
            "ema": self.ema is not None,  # so `train sample` can tell a removed ema.safetensors from EMA off
        }

    def _precision(self) -> str:
        """The compute precision of model and text encoder, as recorded for sampling."""
        return "bf16" if self.autocast == torch.bfloat16 else "fp32"

    def _attention_kernel(self) -> str:
        """The SDPA kernel the joint attention dispatches to (FLASH_ATTENTION wanted on a GPU)."""
        return sdpa_choice(self.model_cfg, self.grid, self.loader.batch_size, self.device,
                           self.autocast or torch.float32, self.empty[0].shape[1])

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
        self.long, self.local = 0, 0
        self.lr, self.start = 0.0, time.perf_counter()

    def add(self, stats: dict[str, Any], samples: int, tokens: int, long: int = 0, local: int = 0) -> None:
        """One step: its stats, global samples and tokens, and this rank's long captions of `local` samples."""
        self.loss = self.loss + stats["loss"]
        self.grad_norm = self.grad_norm + stats["grad_norm"]
        self.lr, self.steps = stats["lr"], self.steps + 1
        self.samples, self.tokens = self.samples + samples, self.tokens + tokens
        self.long, self.local = self.long + long, self.local + local

    def flush(self, device: torch.device) -> dict[str, Any]:
        """Mean loss (over steps and ranks), mean grad norm, last lr, share of samples trained on a
        long caption (all ranks: every rank draws the same number), throughput; then reset."""
        loss = distributed.mean_over_ranks(float(self.loss) / self.steps, device)
        share = distributed.mean_over_ranks(self.long / max(self.local, 1), device)
        record = {"loss": loss, "grad_norm": float(self.grad_norm) / self.steps, "lr": self.lr,
                  "long_caption_share": share}
        record.update(throughput(self.samples, self.tokens, time.perf_counter() - self.start))
        self._reset()
        return record


def shards_digest(manifest: Manifest) -> str:
    """The data a run trains on, whatever its folder is called: its shards' names and sha256."""
    import hashlib

    blob = "\n".join(f"{s.name}\t{s.sha256}\t{s.rows}" for s in manifest.shards)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
