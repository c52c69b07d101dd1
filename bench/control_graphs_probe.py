"""On a CUDA machine: ControlNet (and IP-Adapter) predictions replaying real CUDA graphs give the images eager
PyTorch gives, bit for bit, on the tiny model (the CPU tests use a capture stand-in; this runs the real capture).

    python3 script/tiny_weights.py /tmp/tw && python3 bench/control_graphs_probe.py /tmp/tw --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "test_folder"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("weights", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from conftest import make_predictor, predict_inputs

    work = Path(tempfile.mkdtemp())
    control_image = Image.new("RGB", (320, 256), (235, 230, 220))
    ImageDraw.Draw(control_image).rectangle((80, 60, 200, 180), fill=(10, 10, 10))
    control_image.save(work / "control.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 320, 3), np.uint8)).save(work / "init.png")
    mask = Image.new("L", (320, 256), 0)
    mask.paste(255, (0, 0, 160, 256))
    mask.save(work / "mask.png")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(work / "ref.png")

    predictor = make_predictor(args.weights, work / "lora-cache")
    model = predictor.models.models["illustrious"]
    assert model.graph_capture is not None, "run this on CUDA"
    base = dict(aspect_ratio="custom", width=320, height=256, num_inference_steps=4, output_format="png",
                prompt="1girl", seed=3, disable_safety_checker=True, control_image=work / "control.png",
                control_preprocess=False, control_end=0.6)
    cases = {
        "txt2img": {},
        "img2img": dict(image=work / "init.png", prompt_strength=1.0),
        "inpaint": dict(image=work / "init.png", mask=work / "mask.png", prompt_strength=1.0),
        "hires": dict(hires_scale=1.5, hires_steps=4),
        "with reference": dict(reference_image=work / "ref.png"),
        "depth preprocessor": dict(control_type="depth", control_preprocess=True),
    }

    def images(case):
        paths = predictor.predict(**predict_inputs(**{**base, **case}))
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths]

    graphed = {name: images(case) for name, case in cases.items()}
    stats = dict(model.runner.stats)
    tags = sorted({key[0] for key in model.runner.graphs})
    for m in predictor.models.models.values():
        m.graph_capture, m.runs, m.runner = None, {}, None
    eager = {name: images(case) for name, case in cases.items()}
    result = {
        "equal": {name: all(map(np.array_equal, graphed[name], eager[name])) for name in cases},
        "max_diff": {name: int(max(np.abs(a.astype(int) - b).max() for a, b in zip(graphed[name], eager[name])))
                     for name in cases},
        "graph_tags": tags,
        "runner_stats": stats,
        "device": __import__("torch").cuda.get_device_name(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "control_graphs.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("LORA_ALLOW_LOCAL_HOSTS", "1")
    main()
