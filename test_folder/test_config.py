"""cog.yaml, requirements and the generated OpenAPI schema: what `cog build` and Replicate will read."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

import predict
import utils

REPO = Path(__file__).resolve().parent.parent
COG_SCHEMA = REPO.parent / "shared" / "cog" / "config_schema_v1.0.json"


def cog_config() -> dict:
    return yaml.safe_load((REPO / "cog.yaml").read_text())


def test_cog_yaml_validates_against_cogs_own_schema():
    if not COG_SCHEMA.exists():
        pytest.skip("shared/cog/config_schema_v1.0.json is not beside this checkout")
    schema = json.loads(COG_SCHEMA.read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(cog_config())]
    assert errors == []


def test_cog_yaml_builds_a_gpu_image_of_this_predictor():
    config = cog_config()
    build = config["build"]
    assert build["gpu"] is True
    assert str(build["python_version"]) in ("3.11", "3.12")
    assert build["python_requirements"] == "requirements.txt"
    assert re.fullmatch(r"\d+\.\d+\.\d+", build["sdk_version"])
    assert config["predict"] == "predict.py:Predictor"


def test_requirements_are_exact_pins_of_what_the_model_needs():
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line}"
            pins[name.lower().replace("_", "-")] = version
    assert pins["torch"] == "2.13.0"
    assert pins["diffusers"] == "0.42.1"
    assert pins["cog"] == cog_config()["build"]["sdk_version"] == "0.23.1"
    for name in ("transformers", "accelerate", "safetensors", "huggingface-hub", "peft", "requests", "pillow"):
        assert name in pins
    assert "pytest" not in pins  # test-only tools live in requirements-test.txt


@pytest.fixture(scope="module")
def schema(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("schema") / "openapi_schema.json"
    subprocess.run([sys.executable, str(REPO / "script" / "schema"), "--out", str(out)], check=True,
                   capture_output=True)
    return json.loads(out.read_text())


FLUX_DEV_LORA_INPUTS = [
    "prompt", "aspect_ratio", "image", "prompt_strength", "num_outputs", "num_inference_steps", "guidance", "seed",
    "output_format", "output_quality", "disable_safety_checker", "go_fast", "lora_weights", "lora_scale",
    "extra_lora", "extra_lora_scale", "megapixels", "hf_api_token", "civitai_api_token",
]


def test_schema_has_flux_dev_lora_inputs_with_their_ranges(schema):
    props = schema["components"]["schemas"]["Input"]["properties"]
    assert set(FLUX_DEV_LORA_INPUTS) <= set(props)
    assert schema["components"]["schemas"]["Input"]["required"] == ["prompt"]
    assert (props["num_outputs"]["minimum"], props["num_outputs"]["maximum"], props["num_outputs"]["default"]) == (1, 4, 1)
    assert (props["prompt_strength"]["minimum"], props["prompt_strength"]["maximum"]) == (0, 1)
    assert (props["lora_scale"]["minimum"], props["lora_scale"]["maximum"]) == (-1, 3)
    assert (props["extra_lora_scale"]["minimum"], props["extra_lora_scale"]["maximum"]) == (-1, 3)
    assert (props["output_quality"]["minimum"], props["output_quality"]["maximum"], props["output_quality"]["default"]) == (0, 100, 80)
    assert "default" not in props["num_inference_steps"] and props["num_inference_steps"]["nullable"] is True
    assert (props["num_inference_steps"]["minimum"], props["num_inference_steps"]["maximum"]) == (1, 50)
    assert props["seed"]["type"] == "integer" and props["seed"]["nullable"] is True
    # Strings, so that coglet passes the URL through and weights.input_file fetches it behind the address guard.
    assert all(props[k]["type"] == "string" and "format" not in props[k] for k in ("image", "mask"))
    for token in ("hf_api_token", "civitai_api_token"):
        assert props[token]["format"] == "password" and props[token]["x-cog-secret"] is True
    enums = schema["components"]["schemas"]
    assert enums["output_format"]["enum"] == ["webp", "jpg", "png"]
    assert enums["megapixels"]["enum"] == ["1", "0.25"]
    assert schema["components"]["schemas"]["Output"] == {"title": "Output", "type": "array",
                                                         "items": {"type": "string", "format": "uri"}}


def test_literal_choices_match_the_tables_they_name(schema):
    enums = schema["components"]["schemas"]
    assert enums["aspect_ratio"]["enum"] == list(utils.ASPECT_RATIOS) + ["custom"]
    assert enums["scheduler"]["enum"] == ["default"] + list(utils.SCHEDULERS)
    assert predict.MEGAPIXEL_CHOICES == list(utils.MEGAPIXELS)
    assert predict.OUTPUT_FORMAT_CHOICES == list(utils.OUTPUT_FORMATS)
    for spec in utils.MODEL_SPECS.values():
        assert spec.scheduler in utils.SCHEDULERS
