"""Model side of the predictor: model specs, loading, sizes, generation, image saving."""

from __future__ import annotations

MODEL_DIRS = {"illustrious": "illustrious-xl", "sdxl": "sdxl-base"}
VAE_DIR = "sdxl-vae-fp16-fix"
SAFETY_DIR = "safety-checker"
