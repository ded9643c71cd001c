"""Training stages: one `StageConfig` per `train.stages.<name>` of pipelines.yaml.

Precedence: dataclass defaults < `train.defaults` < `train.stages.<name>` < command-line
flags (`--data`, `--steps`, `--batch-size`, `--micro-batch-size`, `--set key=value`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from core.config import ConfigError, execution, load_yaml, merge, section
from train.data import DataConfig
from train.ema import EMAConfig
from train.optim import OptimConfig
from train.text_encoder import TextConfig

PRECISIONS = ("auto", "bf16", "fp32")  # auto = bf16 autocast on CUDA, fp32 on CPU
CONVENTION_CHOICES = ("auto", "tessera", "meissonic")
DECODES = ("auto", "vq", "codes")  # how sample grids become pixels

DEFAULT_PROMPTS = [
    "a photo of a red fox in the snow",
    "a watercolor painting of a lighthouse at dusk",
    "a bowl of ramen, studio lighting",
    "an astronaut riding a horse on the moon",
]


@dataclass
class SampleConfig:
    every: int = 0  # write a sample grid every N optimizer steps (0 = never; the end always samples if > 0)
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))  # fixed prompts of the grid
    negative_prompt: str = ""  # the unconditional branch of CFG ("" = the empty prompt)
    steps: int = 48  # MaskGIT decoding steps
    cfg: float = 9.0  # classifier-free guidance scale
    seed: int = 0  # sampling noise seed (the same grid every time for comparability)
    decode: str = "auto"  # vq: VQ decoder (required); codes: false-colour code maps; auto: vq if found
    vq: str | None = None  # VQ folder; None = the tokenizer path recorded in the data's manifest

    def __post_init__(self) -> None:
        if self.every < 0 or self.steps < 1 or not (math.isfinite(self.cfg) and self.cfg >= 0):
            raise ValueError(f"sample.every >= 0, sample.steps >= 1 and a finite sample.cfg >= 0 are required "
                             f"(got {self.every}, {self.steps}, {self.cfg})")
        if self.decode not in DECODES:
            raise ValueError(f"sample.decode must be one of {DECODES}, got {self.decode!r}")
        if self.every and not self.prompts:
            raise ValueError("sample.prompts is empty but sample.every > 0")


@dataclass
class StageConfig:
    model: str = "debug"  # preset name in train.model.MODELS
    resolution: int | None = None  # pixels the code shards must have been made at (None = any: debug)
    downsample: bool = False  # add the 2x2 compression layers (stage3, 1024 px)
    batch_size: int = 8  # GLOBAL batch (samples per optimizer step, all GPUs together)
    micro_batch_size: int | None = execution(None)  # per-GPU batch per forward; None = batch_size / GPUs
    steps: int = 100  # optimizer steps of this stage; a rerun with more extends a finished run (not identity)
    init_from: str | None = None  # previous stage's run folder or checkpoint (its final weights)
    init_ema: bool = False  # initialise from the previous stage's EMA weights instead
    cfg_dropout: float = 0.1  # per-sample probability of training on the empty prompt
    precision: str = "auto"  # auto | bf16 | fp32 (autocast dtype of forward/backward)
    compile: bool = execution(False)  # torch.compile each transformer block, embedding and head (train.model.compile_blocks)
    compile_backend: str = execution("inductor")  # torch.compile backend; "aot_eager" traces the same graphs without codegen (tests)
    grad_ckpt: bool = execution(False)  # activation checkpointing per transformer block
    fsdp: bool = False  # shard parameters/optimizer with FSDP2 instead of DDP (many GPUs)
    deterministic: bool = False  # bit-identical resume on CUDA too (trainer.set_determinism); slower
    convention: str = "auto"  # model inputs: tessera | meissonic (the release's) | auto = from the weights
                              # the run starts from (train/convention.py); recorded in every checkpoint
    seed: int = 0  # seeds model init, data order, masking and CFG-dropout noise
    threads: int | None = execution(None)  # CPU intra-op threads (torch.set_num_threads); None = torch's default
    log_every: int = 10  # steps between metrics records
    ckpt_every: int = 1000  # steps between checkpoints (the last step always checkpoints)
    keep_last: int = execution(3)  # checkpoints kept in the run folder (0 = all)
    tensorboard: bool = execution(True)  # also write TensorBoard events under RUN/tb
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=lambda: TextConfig(tiny=True))
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must lie in [0, 2**63), got {self.seed}")
        if self.keep_last < 0:
            raise ValueError(f"keep_last must be >= 0 (0 = keep all), got {self.keep_last}")
        for name in ("batch_size", "steps", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            raise ValueError(f"micro_batch_size must lie in [1, batch_size={self.batch_size}]")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout must lie in [0, 1), got {self.cfg_dropout}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or null for torch's default), got {self.threads}")
        if self.ema.enabled and self.fsdp:
            raise ValueError("ema with fsdp is not supported (the EMA copy would need sharding); use DDP or turn EMA off")
        if self.convention not in CONVENTION_CHOICES:
            raise ValueError(f"convention must be one of {CONVENTION_CHOICES}, got {self.convention!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.ckpt_every % self.log_every:
            raise ValueError(
                f"ckpt_every ({self.ckpt_every}) must be a multiple of log_every ({self.log_every}) "
                "so a resumed run's log intervals line up with an uninterrupted run's"
            )


def stage_names(doc: dict[str, Any]) -> list[str]:
    return sorted(section(doc, "train.stages"))


def load_stage(
    name: str, config_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> StageConfig:
    """The resolved StageConfig of stage `name` (see the module docstring for precedence)."""
    doc = load_yaml(config_path)
    names = stage_names(doc)
    if name not in names:
        raise ConfigError(f"unknown stage {name!r}; pipelines.yaml train.stages has: {', '.join(names) or 'none'}")
    train = section(doc, "train")
    unknown = sorted(set(train) - {"defaults", "stages"})
    if unknown:
        raise ConfigError(f"train: unknown key {unknown[0]!r} (allowed: defaults, stages)")
    return merge(
        StageConfig, section(doc, "train.defaults"), section(doc, f"train.stages.{name}"), overrides,
        where=f"train.stages.{name}",
    )


VQ_DOWNSAMPLE = 16  # the Meissonic/aMUSEd VQ-GAN is f16: a 256 px image is a 16x16 code grid


def _planned_model(cfg: StageConfig):
    """(ModelConfig, code grid) of a stage with a fixed resolution."""
    import dataclasses

    from train.model import MODELS

    if cfg.resolution is None:
        raise ConfigError("plan needs a stage with a fixed resolution (the debug stage takes any shards)")
    if cfg.model not in MODELS:
        raise ConfigError(f"model: unknown preset {cfg.model!r} (known: {', '.join(sorted(MODELS))})")
    side = cfg.resolution // VQ_DOWNSAMPLE
    return dataclasses.replace(MODELS[cfg.model], downsample=cfg.downsample), (side, side)


def plan_stage(cfg: StageConfig, gpus: int, gpu: str, mfu: float) -> dict[str, Any]:
    """GPU-days of a stage from its model's FLOPs per token (see train/flops.py)."""
    from train.flops import plan

    model_cfg, grid = _planned_model(cfg)
    return plan(model_cfg, grid, cfg.steps, cfg.batch_size, gpus, gpu=gpu, mfu=mfu)


def plan_measured(cfg: StageConfig, measured: dict[str, Any], gpu: str, gpus: int) -> dict[str, Any]:
    """GPU-days of a stage from one GPU's measured optimizer step (bench/gpu_stages.py writes
    {"step_s", "micro_batch", "accum", "resolution", ...} per stage), at the stage's own steps
    and global batch from pipelines.yaml."""
    from train.flops import measured_plan

    model_cfg, grid = _planned_model(cfg)
    if measured.get("resolution") != cfg.resolution:
        raise ConfigError(f"measured at {measured.get('resolution')} px, but the stage trains at {cfg.resolution} px")
    out = measured_plan(model_cfg, grid, cfg.steps, cfg.batch_size, float(measured["step_s"]),
                        int(measured["micro_batch"]) * int(measured["accum"]), gpu, gpus)
    return dict(out, measured_micro_batch=measured["micro_batch"], stage_micro_batch=cfg.micro_batch_size)
