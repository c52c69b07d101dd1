"""No token ever shows: predictions through the real Cog server with hf_api_token / civitai_api_token inputs, the
HF_TOKEN / CIVITAI_API_TOKEN / REPLICATE_API_TOKEN environment tokens and signed URL queries, on success and on
failure (401, 404, a login page instead of a file, an unreachable host), then a scan of everything they leave:
the server's stdout/stderr, each prediction's JSON (logs, error, metrics, output), the A1111 metadata and raw
bytes of every output image, and the names and contents of every file in the LoRA cache.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pytest
from PIL import Image

import utils
from cog_server import decode_output
from conftest import ENV_TOKENS
from lora_fixtures import write_kohya_lora, write_replicate_tar

INPUT_TOKENS = {"hf": "hf_inpW8mZ3qHfTok", "civitai": "civ_inpT5gB1nCivTok"}
WRONG_TOKENS = {"hf": "hf_badR2dK6HfTok", "civitai": "civ_badY4hC0wCivTok"}
QUERY_SECRETS = ("AMZsigK4s8PqQy", "QRYtok9Lm2XvZz", "CREDn3Vb7TcW")
SIGNED = f"X-Amz-Signature={QUERY_SECRETS[0]}&token={QUERY_SECRETS[1]}&X-Amz-Credential={QUERY_SECRETS[2]}"
CIVITAI_VERSIONS = (4243, 4244, 4245)  # the fake CivitAI pre-signs its storage redirect with SIGNED<v>SIG

BASE = {"prompt": "1girl, red hat", "seed": 3, "aspect_ratio": "custom", "width": 256, "height": 256,
        "num_inference_steps": 1}


def secrets() -> list[str]:
    """Every secret, and each one's distinctive part (what would survive a half-hearted mask of its prefix)."""
    tokens = [*ENV_TOKENS.values(), *INPUT_TOKENS.values(), *WRONG_TOKENS.values()]
    return tokens + [t.split("_", 1)[1] for t in tokens] + list(QUERY_SECRETS) + [
        f"SIGNED{v}SIG" for v in CIVITAI_VERSIONS]


@pytest.fixture(scope="module")
def cases(predictor, faults_fakes, tmp_path_factory) -> dict[str, tuple[dict, str]]:
    """name -> (inputs, what the prediction must do: "succeeded" or a text its error must contain)."""
    pipe = predictor.models.models["illustrious"].txt2img
    folder = tmp_path_factory.mktemp("secret-loras")

    def lora_bytes(seed: int) -> bytes:
        write_kohya_lora(folder / f"{seed}.safetensors", pipe, seed=seed)
        return (folder / f"{seed}.safetensors").read_bytes()

    hf, civitai, replicate, files = faults_fakes.hf, faults_fakes.civitai, faults_fakes.replicate, faults_fakes.files
    hf.add_file("tok/private-input", "pytorch_lora_weights.safetensors", lora_bytes(21))
    hf.set_private("tok/private-input", INPUT_TOKENS["hf"])
    hf.add_file("tok/private-env", "pytorch_lora_weights.safetensors", lora_bytes(22))
    hf.set_private("tok/private-env", ENV_TOKENS["HF_TOKEN"])
    civitai.add_version(4242, 4243, lora_bytes(23), token=INPUT_TOKENS["civitai"])
    civitai.add_version(4242, 4244, lora_bytes(24), token=ENV_TOKENS["CIVITAI_API_TOKEN"])
    civitai.add_version(4242, 4245, lora_bytes(25), token=INPUT_TOKENS["civitai"])
    write_replicate_tar(folder / "trained_model.tar", pipe)
    replicate.add_version("tok/trained", "v1", (folder / "trained_model.tar").read_bytes())
    files.add_file("/signed/lora.safetensors", lora_bytes(26))
    files.add_file("/signed/login.safetensors", b"<html><body>Please log in</body></html>",
                   content_type="text/html")
    civ = "https://civitai.com/models/4242?modelVersionId="
    return {
        "hf-input-token": ({"lora_weights": "hf://tok/private-input", "hf_api_token": INPUT_TOKENS["hf"],
                            "output_format": "png"}, "succeeded"),
        "hf-env-token": ({"lora_weights": "hf://tok/private-env", "output_format": "jpg"}, "succeeded"),
        "civitai-input-token": ({"lora_weights": civ + "4243", "civitai_api_token": INPUT_TOKENS["civitai"],
                                 "output_format": "webp"}, "succeeded"),
        "civitai-env-token": ({"extra_lora": civ + "4244", "output_format": "png"}, "succeeded"),
        "replicate-env-token": ({"lora_weights": "tok/trained", "prompt": "a photo of TOK", "output_format": "jpg"},
                                "succeeded"),
        "signed-url": ({"lora_weights": f"{files.url}/signed/lora.safetensors?{SIGNED}", "output_format": "png"},
                       "succeeded"),
        "hf-wrong-token-401": ({"lora_weights": "hf://tok/private-input", "hf_api_token": WRONG_TOKENS["hf"]},
                               "hf_api_token"),
        "civitai-wrong-token-401": ({"lora_weights": civ + "4245", "civitai_api_token": WRONG_TOKENS["civitai"]},
                                    "civitai_api_token"),
        "signed-url-404": ({"lora_weights": f"{files.url}/signed/missing.safetensors?{SIGNED}"}, "not found"),
        "signed-url-login-page": ({"extra_lora": f"{files.url}/signed/login.safetensors?{SIGNED}"}, "extra_lora"),
        "signed-url-unreachable": ({"lora_weights": f"http://127.0.0.1:1/x.safetensors?{SIGNED}"}, "could not reach"),
    }


@pytest.fixture(scope="module")
def results(faults_server, cases) -> dict[str, dict]:
    return {name: faults_server.predict({**BASE, **inputs}) for name, (inputs, _) in cases.items()}


def output_texts(result: dict) -> list[str]:
    """Each output file's raw bytes (as latin-1 text) and its A1111 metadata, decoded as a reader would."""
    texts = []
    for item in result.get("output") or []:
        _, payload = decode_output(item)
        texts.append(payload.decode("latin-1"))
        with tempfile.NamedTemporaryFile(suffix=".img") as file:
            file.write(payload)
            file.flush()
            texts.append(utils.read_parameters(file.name) or "")
        texts.append(json.dumps({k: str(v) for k, v in Image.open(io.BytesIO(payload)).info.items()}))
    return texts


def folder_texts(root: Path) -> list[str]:
    """Every path under `root` and every file's contents."""
    texts = []
    for path in sorted(root.rglob("*")):
        texts.append(str(path.relative_to(root)))
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    return texts


def test_every_path_did_what_it_should(cases, results):
    for name, (_, expected) in cases.items():
        result = results[name]
        if expected == "succeeded":
            assert result["status"] == "succeeded", (name, result.get("error"))
            assert "Lora hashes" in "".join(output_texts(result)), name
        else:
            assert result["status"] == "failed", (name, result)
            assert expected in result["error"], (name, result["error"])


@pytest.mark.parametrize("where", ["server output", "prediction JSON", "output images", "LoRA cache"])
def test_no_token_or_signed_query_appears(faults_server, results, where):
    if where == "server output":
        texts = [faults_server.log_path.read_text("utf-8", errors="replace"), json.dumps(faults_server.health())]
    elif where == "prediction JSON":
        texts = [json.dumps(result) for result in results.values()]
    elif where == "output images":
        texts = [text for result in results.values() for text in output_texts(result)]
    else:
        texts = folder_texts(faults_server.lora_cache)
    blob = "\n".join(texts)
    leaked = [secret for secret in secrets() if secret in blob]
    assert not leaked, f"{where} shows {leaked}"
