"""The developer commands as a model owner runs them: script/predict (like `cog predict`) and script/tiny_weights.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def run_predict(args: list[str], weights_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, WEIGHTS_DIR=str(weights_dir))
    return subprocess.run([str(REPO / "script" / "predict"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_script_predict_writes_outputs_and_reports_failures(tiny_weights, tmp_path):
    Image.new("RGB", (300, 200), (200, 40, 40)).save(tmp_path / "in.png")
    ok = run_predict(["-i", "prompt=1girl, red hat", "-i", "image=@in.png", "-i", "num_inference_steps=2",
                      "-i", "megapixels=0.25", "-i", "seed=1", "-i", "output_format=png", "-o", "out"],
                     tiny_weights, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "Using seed: 1" in ok.stderr
    assert Image.open(tmp_path / "out" / "out-0.png").size == (640, 416)

    failed = run_predict(["-i", "prompt=(cat:1.2.3)", "-i", "num_inference_steps=1"], tiny_weights, tmp_path)
    assert failed.returncode == 1
    assert "prompt: attention weight" in failed.stderr
    assert not list(tmp_path.glob("out-*"))  # nothing written to the current folder


def test_script_predict_refuses_unknown_inputs_before_starting(tmp_path):
    result = run_predict(["-i", "promt=a cat"], tmp_path / "unused", tmp_path)
    assert result.returncode != 0 and "unknown input 'promt'" in result.stderr


def test_tiny_weights_writes_the_real_layout(tiny_weights):
    import utils

    utils.check_weights_dir(tiny_weights)  # built by script/tiny_weights.py (conftest)
    for folder in utils.MODEL_DIRS.values():
        assert (tiny_weights / folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
        assert not (tiny_weights / folder / "vae").exists()  # both models share sdxl-vae-fp16-fix
