"""Custom checkpoints (the `checkpoint` input) end to end on the tiny model: single A1111-layout files written by
ldm_checkpoint.py, served from loopback, converted, cached, switched, verified and refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import utils
import weights
from conftest import make_predictor, predict_inputs
from fakes import FakeCivitai, FakeHFHub, sha256
from ldm_checkpoint import VAE_PREFIX, build_ldm_state_dict
from lora_fixtures import write_kohya_lora

SMALL = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=1, output_format="png",
             prompt="1girl, red hat", seed=3, disable_safety_checker=True)
# The SDXL preset's sampling settings, so a checkpoint of the tiny sdxl-base weights can be compared with it.
SDXL_SETTINGS = dict(scheduler="DPM++ 2M Karras", guidance=7.0, negative_prompt="")


def write_checkpoint(path, weights_dir, model="illustrious", *, vae=True, extra=None):
    state = build_ldm_state_dict(weights_dir / utils.MODEL_DIRS[model], weights_dir / utils.VAE_DIR)
    if not vae:
        state = {k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)}
    state.update(extra or {})
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def files(tiny_weights, file_host):
    folder = file_host.folder / "checkpoints"
    folder.mkdir()
    marker = torch.zeros(0)
    write_checkpoint(folder / "illu.safetensors", tiny_weights)
    write_checkpoint(folder / "illu-novae.safetensors", tiny_weights, vae=False)
    write_checkpoint(folder / "sdxl.safetensors", tiny_weights, "sdxl", vae=False)
    write_checkpoint(folder / "vpred.safetensors", tiny_weights, vae=False, extra={"v_pred": marker})
    write_checkpoint(folder / "ztsnr.safetensors", tiny_weights, vae=False, extra={"v_pred": marker, "ztsnr": marker})
    good = (folder / "illu-novae.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.ones(4),
               "model.diffusion_model.out.2.bias": torch.ones(4)}, str(folder / "sd15.safetensors"))
    return {p.name: f"{file_host.url}/checkpoints/{p.name}" for p in folder.iterdir()}


@pytest.fixture(scope="module")
def pred(tiny_weights, tmp_path_factory):
    instance = make_predictor(tiny_weights, tmp_path_factory.mktemp("ckpt-lora-cache"))
    instance.checkpoint_cache = weights.CheckpointCache(tmp_path_factory.mktemp("ckpt-cache"), min_file_bytes=0,
                                                       min_free_bytes=0)
    return instance


def image(pred, **overrides) -> np.ndarray:
    (path,) = pred.predict(**predict_inputs(**{**SMALL, **overrides}))
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def baked(pred):
    return {"illustrious": image(pred), "sdxl": image(pred, use_standard_sdxl=True, **SDXL_SETTINGS)}


def custom_models(pred) -> list[str]:
    return [k for k in pred.models.models if k not in utils.MODEL_SPECS]


def test_single_file_gives_the_image_of_its_diffusers_twin_and_reuses_modules(pred, files, baked):
    # The file holds exactly the baked Illustrious weights (+ the shared VAE): same image, bit for bit.
    assert np.array_equal(image(pred, checkpoint=files["illu.safetensors"]), baked["illustrious"])
    model = pred.models.models[pred.custom_key]
    illustrious = pred.models.models["illustrious"].txt2img
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert getattr(model.txt2img, name) is getattr(illustrious, name), name  # identical: not held twice
    assert model.txt2img.unet is not illustrious.unet
    assert model.scheduler_config["prediction_type"] == "epsilon"
    # Without first_stage_model keys the shared VAE is used: the same image again.
    assert np.array_equal(image(pred, checkpoint=files["illu-novae.safetensors"]), baked["illustrious"])
    # Another model's weights (the tiny sdxl-base as one file): the image of its diffusers folder.
    assert np.array_equal(image(pred, checkpoint=files["sdxl.safetensors"], **SDXL_SETTINGS), baked["sdxl"])
    assert len(custom_models(pred)) == 1  # switching keeps one custom model resident
    assert pred.models.models[pred.custom_key].spec.title.endswith("sdxl.safetensors")


def test_diffusers_folder_from_a_hub_repo(pred, tiny_weights, baked, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with FakeHFHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        folder = tiny_weights / utils.MODEL_DIRS["illustrious"]
        for path in folder.rglob("*"):
            if path.is_file():
                rel = path.relative_to(folder).as_posix().replace("model.safetensors", "model.fp16.safetensors")
                hub.add_file("acme/illu-diffusers", rel, path.read_bytes())  # unet/text encoders as fp16 variants
        for path in (tiny_weights / utils.VAE_DIR).iterdir():
            hub.add_file("acme/illu-diffusers", f"vae/{path.name}", path.read_bytes())
        hub.add_file("acme/illu-diffusers", "unet/diffusion_pytorch_model.bin", b"\x80pickle")  # never fetched
        hub.add_file("acme/illu-diffusers", "illu-single-file.safetensors", b"not this")  # a folder wins
        assert np.array_equal(image(pred, checkpoint=f"{hub.url}/acme/illu-diffusers"), baked["illustrious"])
        assert hub.count("diffusion_pytorch_model.bin") == 0
    model = pred.models.models[pred.custom_key]
    assert (pred.checkpoint_cache.root / "entries").exists() and model.txt2img.vae is pred.models.models[
        "illustrious"].txt2img.vae


def test_v_prediction_markers(pred, files, baked):
    vpred = image(pred, checkpoint=files["vpred.safetensors"])
    config = pred.models.models[pred.custom_key].scheduler_config
    assert config["prediction_type"] == "v_prediction" and not config.get("rescale_betas_zero_snr")
    assert not np.array_equal(vpred, baked["illustrious"])
    ztsnr = image(pred, checkpoint=files["ztsnr.safetensors"])
    config = pred.models.models[pred.custom_key].scheduler_config
    assert config["prediction_type"] == "v_prediction" and config["rescale_betas_zero_snr"]
    assert config["timestep_spacing"] == "trailing"
    assert not np.array_equal(ztsnr, vpred)
    assert len(custom_models(pred)) == 1


def test_lora_applies_to_the_custom_model_and_leaves_the_baked_one_alone(pred, files, baked, file_host):
    write_kohya_lora(file_host.folder / "ckpt-kohya.safetensors", pred.models.models["illustrious"].txt2img)
    lora_url = f"{file_host.url}/ckpt-kohya.safetensors"
    # The file holds Illustrious' weights, so without the LoRA its image is the baked one.
    with_lora = image(pred, checkpoint=files["illu-novae.safetensors"], lora_weights=lora_url)
    assert not np.array_equal(with_lora, baked["illustrious"])
    # The custom model shares its text encoders with Illustrious: the LoRA must not leak into it.
    assert np.array_equal(image(pred), baked["illustrious"])
    assert np.array_equal(image(pred, checkpoint=files["illu-novae.safetensors"]), baked["illustrious"])


def test_eviction_and_redownload(pred, files, file_host, tmp_path):
    folder = file_host.folder / "checkpoints"
    size = max((folder / n).stat().st_size for n in ("illu-novae.safetensors", "sdxl.safetensors"))
    saved = pred.checkpoint_cache
    try:
        # A cap below two checkpoints: the older one is evicted from disk, switching back downloads it again.
        cache = pred.checkpoint_cache = weights.CheckpointCache(tmp_path / "cache", max_bytes=int(size * 1.5),
                                                                min_file_bytes=0, min_free_bytes=0)
        refs = {n: weights.parse_checkpoint_ref(files[n]) for n in ("illu-novae.safetensors", "sdxl.safetensors")}

        def fetch(name):
            pred.checkpoint_cache.release(pred.fetch_checkpoint(refs[name], weights.Tokens()).ref)

        fetch("illu-novae.safetensors")
        first = next((cache.root / "entries").iterdir())
        fetch("sdxl.safetensors")
        assert cache.stats["entries"] == 1 and cache.stats["misses"] == 2 and not first.exists()
        fetch("illu-novae.safetensors")
        assert cache.stats["misses"] == 3 and cache.stats["hits"] == 0
        fetch("illu-novae.safetensors")
        assert cache.stats["hits"] == 1
    finally:
        pred.checkpoint_cache = saved


@pytest.mark.parametrize("name, message", [
    ("truncated.safetensors", "truncated"),
    ("sd15.safetensors", "SD 1.x"),
    ("lora", "LoRA"),
])
def test_bad_files_are_clear_errors(pred, files, file_host, name, message):
    if name == "lora":
        write_kohya_lora(file_host.folder / "as-checkpoint.safetensors", pred.models.models["illustrious"].txt2img)
        url = f"{file_host.url}/as-checkpoint.safetensors"
    else:
        url = files[name]
    with pytest.raises((weights.WeightsError, utils.InputError)) as info:
        image(pred, checkpoint=url)
    assert str(info.value).startswith("checkpoint:") and message in str(info.value), str(info.value)


def test_small_file_is_not_a_checkpoint_by_default(pred, files, tmp_path):
    saved = pred.checkpoint_cache
    try:
        pred.checkpoint_cache = weights.CheckpointCache(tmp_path / "cache", min_free_bytes=0)
        with pytest.raises(weights.IncompatibleError, match="checkpoint: .*too small.*lora_weights"):
            image(pred, checkpoint=files["illu.safetensors"])
    finally:
        pred.checkpoint_cache = saved


def test_civitai_checksum_and_base_model(pred, files, file_host, monkeypatch):
    data = (file_host.folder / "checkpoints" / "illu-novae.safetensors").read_bytes()
    with FakeCivitai() as civitai:
        monkeypatch.setenv("CIVITAI_API_BASE", civitai.url)
        civitai.add_version(7, 70, data, model_type="Checkpoint", sha=sha256(b"other"))
        civitai.add_version(8, 80, data, model_type="Checkpoint", base_model="SD 1.5")
        with pytest.raises(weights.ChecksumError, match="^checkpoint: .*checksum"):
            image(pred, checkpoint=f"{civitai.url}/models/7?modelVersionId=70")
        with pytest.raises(weights.IncompatibleError, match="^checkpoint: .*SD 1.5"):
            image(pred, checkpoint=f"{civitai.url}/models/8")
        civitai.add_version(10, 100, data, model_type="LORA")
        with pytest.raises(weights.IncompatibleError, match="^checkpoint: .*is not a checkpoint"):
            image(pred, checkpoint=f"{civitai.url}/models/10")
        # CivitAI metadata marks v-prediction (NoobAI-XL V-Pred) where the file's keys do not.
        civitai.add_version(9, 90, data, model_type="Checkpoint", base_model="NoobAI")
        civitai.versions[90]["name"] = "V-Pred 1.0"
        image(pred, checkpoint=f"{civitai.url}/models/9")
        assert pred.models.models[pred.custom_key].scheduler_config["prediction_type"] == "v_prediction"


def test_input_errors():
    import predict

    with pytest.raises(utils.InputError, match="^checkpoint: .*use_standard_sdxl"):
        predict.check_inputs(**{**check_defaults(), "checkpoint": "https://x.test/a.safetensors",
                                "use_standard_sdxl": True})
    for text in ("owner/model", "data:application/octet-stream;base64,AAAA"):
        with pytest.raises(weights.InvalidReferenceError, match="^checkpoint: "):
            predict.check_inputs(**{**check_defaults(), "checkpoint": text})


def check_defaults() -> dict:
    import inspect

    import predict

    values = predict_inputs(prompt="x")
    names = inspect.signature(predict.check_inputs).parameters
    return {k: v for k, v in values.items() if k in names}
