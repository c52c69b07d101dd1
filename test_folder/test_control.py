"""ControlNet (sdxl/control.py, sdxl/preprocess.py) on the tiny model and its tiny union ControlNet: the controlled step
against stock diffusers' union pipeline, exact "off" settings, the guidance window, CUDA-graph replays (with the
re-running stand-in capture of test_graphs.py), the map fitting, the preprocessors, errors and metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import predict
import utils
from conftest import predict_inputs
from sdxl import control, preprocess, prompts
from test_graphs import rerun_capture, use_graphs

SIZE = (64, 64)


def drawn_image(size=(64, 64)) -> Image.Image:
    """A dark square and a diagonal stroke on a light background: edges, lines and flat areas."""
    image = Image.new("RGB", size, (235, 230, 220))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle((w // 4, h // 4, w // 2, h // 2), fill=(20, 30, 40))
    draw.line((w // 2, h - 8, w - 8, h // 2), fill=(10, 10, 10), width=3)
    return image


@pytest.fixture(scope="module")
def controlnet(predictor):
    return predictor.controlnets.get()


@pytest.fixture(scope="module")
def embeds(predictor):
    model = predictor.models.models["illustrious"]
    return prompts.encode_prompts(model.txt2img, "1girl, red hat", "lowres", clip_skip=2).as_pipeline_kwargs()


def unit(strength=0.8, start=0.0, end=1.0, control_type="canny") -> control.ControlRequest:
    return control.ControlRequest(image=drawn_image(SIZE), type=control_type, preprocess=False, strength=strength,
                                  start=start, end=end)


def latents(pipe, model, embeds, steps=3, **kwargs) -> torch.Tensor:
    pipe.scheduler = utils.make_scheduler("Euler", model.scheduler_config)
    with torch.no_grad():
        return pipe(**embeds, num_inference_steps=steps, guidance_scale=6.0, generator=torch.Generator().manual_seed(4),
                    output_type="latent", **kwargs).images


def controlled(model, controlnet, mode, request, embeds, **kwargs) -> torch.Tensor:
    run = control.ControlRun(request=request, controlnet=controlnet, map=request.image)
    return latents(control.pipeline(model, mode, False, run, SIZE), model, embeds, **kwargs)


def test_controlled_steps_are_stock_diffusers_union_pipeline_steps(predictor, controlnet, embeds):
    from diffusers import StableDiffusionXLControlNetUnionPipeline

    model = predictor.models.models["illustrious"]
    stock = StableDiffusionXLControlNetUnionPipeline.from_pipe(model.txt2img, controlnet=controlnet,
                                                               add_watermarker=False, torch_dtype=torch.float32)
    stock.set_progress_bar_config(disable=True)
    size = dict(width=SIZE[0], height=SIZE[1])
    plain = latents(model.pipeline("txt2img"), model, embeds, **size)
    request = unit(strength=0.8, start=0.3, end=0.7)  # of 3 steps only the middle one lies inside the window
    ours = controlled(model, controlnet, "txt2img", request, embeds, **size)
    theirs = latents(stock, model, embeds, control_image=[request.image], control_mode=[3],
                     controlnet_conditioning_scale=0.8, control_guidance_start=0.3, control_guidance_end=0.7, **size)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, plain)
    assert model.runs[("control", "txt2img")].unet.controlled_calls == 1
    # A window holding no whole step: no ControlNet call, bitwise the plain steps.
    assert torch.equal(controlled(model, controlnet, "txt2img", unit(start=0.4, end=0.6), embeds, **size), plain)
    assert model.runs[("control", "txt2img")].unet.controlled_calls == 0


def test_img2img_and_inpainting_are_controlled_and_replay_cuda_graphs(predictor, controlnet, embeds):
    model = predictor.models.models["illustrious"]
    init = drawn_image(SIZE).transpose(Image.Transpose.ROTATE_90)
    mask = Image.new("L", SIZE, 0)
    mask.paste(255, (0, 0, 32, 64))
    cases = {
        "txt2img": dict(width=SIZE[0], height=SIZE[1]),
        "img2img": dict(image=init, strength=1.0),
        "inpaint": dict(image=init, mask_image=mask, strength=1.0, width=SIZE[0], height=SIZE[1]),
    }
    request = unit(strength=1.2, start=0.0, end=0.6)  # step 0 of 2 controlled, step 1 plain
    eager = {}
    for mode, kwargs in cases.items():
        eager[mode] = controlled(model, controlnet, mode, request, embeds, steps=2, **kwargs)
        assert model.runs[("control", mode)].unet.controlled_calls == 1, mode
    use_graphs(predictor, rerun_capture)
    try:
        for mode, kwargs in cases.items():
            got = controlled(model, controlnet, mode, request, embeds, steps=2, **kwargs)
            assert torch.equal(got, eager[mode]), mode
            assert model.runs[("control", mode)].unet.eager_calls == 0
        tags = {key[0] for key in model.runner.graphs}
        assert tags == {"controlnet:3", "unet+control", "unet"}
        assert model.runner.stats["replays"] > 0
    finally:
        use_graphs(predictor, None)


def test_predictions_with_control_off_are_the_plain_image_and_metadata_records_the_unit(predictor, tmp_path):
    path = tmp_path / "control.png"
    drawn_image((300, 200)).save(path)
    small = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=1, output_format="png",
                 prompt="1girl", seed=9, use_standard_sdxl=True)  # the other base model than the tests above

    def image(**kwargs):
        (out,) = predictor.predict(**predict_inputs(**small, **kwargs))
        return np.asarray(Image.open(out).convert("RGB")), out

    plain, _ = image()
    assert np.array_equal(image(control_image=path, control_strength=0.0)[0], plain)
    controlled_image, out = image(control_image=path, control_type="depth", control_strength=0.7)
    assert not np.array_equal(controlled_image, plain)
    text = utils.read_parameters(out)
    assert ('ControlNet 0: "Module: depth_anything_v2, Model: controlnet-union-sdxl-1.0-promax [' in text)
    assert ("Weight: 0.7, Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 256, Guidance Start: 0.0, "
            "Guidance End: 1.0, Pixel Perfect: True, Control Mode: Balanced, Hr Option: Both, Save Detected Map: "
            'True", Version: sdxl-lora-cog') in text


def test_crop_and_resize_covers_the_output_and_keeps_the_centre():
    # Three 100-px bands; a square output keeps only the middle band (left/right or top/bottom cut equally).
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    wide = Image.new("RGB", (300, 100))
    tall = Image.new("RGB", (100, 300))
    for i, colour in enumerate(colours):
        wide.paste(colour, (100 * i, 0, 100 * (i + 1), 100))
        tall.paste(colour, (0, 100 * i, 100, 100 * (i + 1)))
    for source in (wide, tall):
        fitted = np.asarray(control.crop_and_resize(source, (64, 64))).astype(int)
        assert fitted.shape == (64, 64, 3)
        inner = fitted[4:-4, 4:-4]  # away from the resampling filter's reach of the cut bands
        assert np.abs(inner - (0, 255, 0)).max() <= 2
    # Other aspect ratio out: 300x100 to 96x64 scales by 0.64 (192x64) and cuts 48 px each side: the middle third
    # of the output is the green band's centre, the outer parts are the red and blue bands' inner halves.
    fitted = np.asarray(control.crop_and_resize(wide, (96, 64))).astype(int)
    assert fitted.shape == (64, 96, 3)
    assert np.abs(fitted[:, 24:72] - (0, 255, 0))[:, 2:-2].max() <= 2
    assert np.abs(fitted[:, :14] - (255, 0, 0)).max() <= 2 and np.abs(fitted[:, -14:] - (0, 0, 255)).max() <= 2


def test_preprocessors_on_a_drawn_image():
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(10, 10, 10))
    edges = np.asarray(preprocess.control_map("canny", image, True))[:, :, 0] > 0
    border = np.zeros((64, 64), bool)
    border[14:50, 14:50] = True
    border[18:46, 18:46] = False  # a 2-px band each side of the square's outline
    assert edges.any() and not (edges & ~border).any()  # edges only on the outline ...
    for side in (edges[16:48, 14:18], edges[16:48, 46:50], edges[14:18, 16:48], edges[46:50, 16:48]):
        assert side.any(axis=1 if side.shape[0] == 32 else 0).all()  # ... and all around it

    sketch = Image.new("RGB", (64, 64), (250, 250, 250))
    ImageDraw.Draw(sketch).line((8, 32, 56, 32), fill=(0, 0, 0), width=3)
    strokes = np.asarray(preprocess.control_map("scribble", sketch, True))[:, :, 0] > 0
    assert strokes[31:34, 12:52].all()  # white where the line is
    assert not strokes[:24].any() and not strokes[41:].any()  # black away from it

    assert np.array_equal(np.asarray(preprocess.control_map("tile", image, True)), np.asarray(image))
    drawn = drawn_image()
    assert np.array_equal(np.asarray(preprocess.control_map("openpose", drawn, False)), np.asarray(drawn))


def test_depth_preprocessor_runs_the_baked_model_lazily(predictor):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    image = drawn_image((96, 64))
    depth = np.asarray(predictor.preprocessors.map("depth", image, True))
    assert depth.shape == (64, 96, 3) and depth.min() == 0 and depth.max() == 255  # stretched to 0-255
    assert (depth == depth[:, :, :1]).all()  # grey
    # The model's own output at its input resolution, resized by nearest sampling here: the map follows it.
    folder = predictor.weights_dir / preprocess.DEPTH_DIR
    model, processor = AutoModelForDepthEstimation.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        raw = model(**processor(images=image, return_tensors="pt")).predicted_depth[0]
    coarse = torch.nn.functional.interpolate(raw[None, None], size=(64, 96), mode="nearest")[0, 0].numpy()
    assert np.corrcoef(coarse.ravel(), depth[:, :, 0].ravel().astype(float))[0, 1] > 0.9


def test_bad_control_inputs_are_errors_naming_the_input(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    huge = tmp_path / "huge.png"
    Image.new("1", (4100, 4100)).save(huge)
    good = tmp_path / "good.png"
    drawn_image().save(good)
    base = dict(prompt="1girl", negative_prompt=None, aspect_ratio="1:1", width=None, height=None, megapixels="1",
                image=None, mask=None, prompt_strength=0.8, num_outputs=1, num_inference_steps=None, guidance=None,
                scheduler="default", clip_skip=2, guidance_rescale=0.0, quality_tags=False, lora_weights=None,
                lora_scale=1.0, extra_lora=None, extra_lora_scale=1.0, output_format="png", output_quality=80,
                disable_safety_checker=False, use_standard_sdxl=False)
    cases = [
        (dict(control_image=text), "control_image: expected a PNG, JPEG or WebP image"),
        (dict(control_image=huge), "control_image: expected at most"),
        (dict(control_image=good, control_type="pose"), "control_type: expected one of"),
        (dict(control_image=good, control_strength=2.5), "control_strength: expected 0 to 2"),
        (dict(control_image=good, control_end=1.5), "control_end: expected 0 to 1"),
        (dict(control_image=good, go_fast=True), "go_fast: step caching does not run with a control_image"),
    ]
    for inputs, message in cases:
        with pytest.raises(utils.InputError, match=message):
            predict.check_inputs(**base, **inputs)
    request = predict.check_inputs(**base, control_image=good, control_type="depth", control_preprocess=False)
    assert request.control.image.size == (1024, 1024) and request.control.type == "depth"
    for off in (dict(control_strength=0.0), dict(control_start=0.5, control_end=0.5), dict(control_end=0.0)):
        assert predict.check_inputs(**base, control_image=good, **off).control is None  # runs as without control
    # "" (what a web form sends) is no image; a unit that cannot act does not fetch its image at all (this address
    # would be refused if it were asked for)
    blank = predict.check_inputs(**base, control_image="", reference_image=" ")
    assert blank.control is None and blank.reference is None
    unreachable = "https://192.0.0.192/x.png"
    assert predict.check_inputs(**base, control_image=unreachable, control_strength=0.0).control is None
    assert predict.check_inputs(**base, reference_image=unreachable, reference_strength=0.0).reference is None


def test_control_through_the_cog_server(cog_server):
    import io

    from cog_server import data_uri, decode_output

    small = dict(prompt="1girl", aspect_ratio="custom", width=256, height=256, num_inference_steps=1,
                 output_format="png", seed=2)
    result = cog_server.predict({**small, "control_image": data_uri(drawn_image((200, 300))),
                                 "control_strength": 1.5, "control_end": 0.8, "reference_mode": "style",
                                 "reference_image": data_uri(drawn_image((64, 96)), "JPEG")})
    assert result["status"] == "succeeded", result.get("error")
    _, payload = decode_output(result["output"][0])
    text = Image.open(io.BytesIO(payload)).info["parameters"]
    assert 'ControlNet 0: "Module: canny, Model: controlnet-union-sdxl-1.0-promax [' in text
    assert "Weight: 1.5," in text and "Threshold A: 100, Threshold B: 200," in text and "Guidance End: 0.8," in text
    assert 'ControlNet 1: "Module: ip-adapter_clip_sdxl_plus_vith, Model: ip-adapter-plus_sdxl_vit-h [' in text
    assert "Weight: 0.6," in text and "IP-Adapter mode: style" in text
    failed = cog_server.predict({**small, "control_image": "data:text/plain;base64,aGVsbG8="})
    assert failed["status"] == "failed" and "control_image: expected a PNG, JPEG or WebP image" in failed["error"]
    assert cog_server.post({**small, "control_type": "pose"}).status_code == 422


def test_download_weights_lays_out_the_pinned_controlnet_and_refuses_another_file(tiny_weights, tmp_path,
                                                                                    monkeypatch):
    """script/download_weights' controlnet component against a fake Hub serving the tiny ControlNet under the real
    repo's promax names: refused while the pin is the real file's sha256; with the pin set to the tiny file's,
    renamed into a diffusers folder that loads."""
    import hashlib

    from fakes import FakeHFHub
    from test_hf_download import _load_script

    script = _load_script()
    folder = tiny_weights / control.CONTROLNET_DIR
    weights_file = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    source = script.SOURCES["controlnet"]
    with FakeHFHub() as hub:
        hub.add_file(source["repo"], "config_promax.json", (folder / "config.json").read_bytes())
        hub.add_file(source["repo"], "diffusion_pytorch_model_promax.safetensors", weights_file, lfs=True)
        hub.add_file(source["repo"], "diffusion_pytorch_model.safetensors", b"decoy " * 20, lfs=True)
        hub.set_commit(source["repo"], script.PINS["controlnet"]["commit"])
        for name, value in (("HF_ENDPOINT", hub.url), ("NO_PROXY", "127.0.0.1,localhost"),
                            ("HF_HOME", str(tmp_path / "hf-home")), ("HF_HUB_DISABLE_XET", "1")):
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        dest = tmp_path / "weights"
        with pytest.raises(script.DownloadError, match="pinned sha256 mismatch: xinsir/controlnet-union-sdxl-1.0/"
                                                        "diffusion_pytorch_model_promax.safetensors"):
            script.install("controlnet", dest, script.Hub, force=False)
        assert not (dest / control.CONTROLNET_DIR).exists() and not list(dest.iterdir())

        def pin_tiny(name: str, files: dict[str, bytes]) -> None:
            monkeypatch.setitem(script.PINS, name, {"commit": script.PINS[name]["commit"], "files": {
                path: (len(data), hashlib.sha256(data).hexdigest()) for path, data in files.items()}})

        def install_from(name: str, folder: Path) -> None:
            """The component's files served from a tiny folder of the same layout, its weights pinned to them."""
            source = script.SOURCES[name]
            for path in source["files"]:
                hub.add_file(source["repo"], path, (folder / path).read_bytes())
            hub.set_commit(source["repo"], script.PINS[name]["commit"])
            pin_tiny(name, {p: (folder / p).read_bytes() for p in script.PINS[name]["files"]})
            script.install(name, dest, script.Hub, force=False)

        pin_tiny("controlnet", {"diffusion_pytorch_model_promax.safetensors": weights_file})
        script.install("controlnet", dest, script.Hub, force=False)
        # The depth model: the same pinned path without renames, and its own load check.
        depth_weights = (tiny_weights / preprocess.DEPTH_DIR / "model.safetensors").read_bytes()
        install_from("depth", tiny_weights / preprocess.DEPTH_DIR)
        # The IP-Adapter: h94's own layout (two folders), kept as it is.
        from sdxl import reference
        ref_source = script.SOURCES["reference"]
        install_from("reference", tiny_weights / reference.REFERENCE_DIR)
        assert sorted(p.relative_to(dest).as_posix() for p in (dest / reference.REFERENCE_DIR).rglob("*.*")) == sorted(
            [f"{reference.REFERENCE_DIR}/{p}" for p in ref_source["files"]] + [f"{reference.REFERENCE_DIR}/MANIFEST.json"])
    # `script/download_weights --check` (what owners run before `cog build`) passes the three folders offline
    control_only = [arg for name in ("controlnet", "depth", "reference") for arg in ("--only", name)]
    assert script.main(["--dest", str(dest), "--check", *control_only]) == 0
    out = dest / control.CONTROLNET_DIR
    assert sorted(p.name for p in out.iterdir()) == ["MANIFEST.json", "config.json",
                                                     "diffusion_pytorch_model.safetensors"]
    assert (out / "diffusion_pytorch_model.safetensors").read_bytes() == weights_file
    assert control.load_controlnet(out, torch.device("cpu"), torch.float32).config.num_control_type == 8
    assert (dest / preprocess.DEPTH_DIR / "model.safetensors").read_bytes() == depth_weights


@pytest.fixture(scope="module")
def fresh_pipes(tiny_weights):
    """Two SDXL pipelines of the tiny Illustrious weights of their own (no LoRA another test merged), with the
    image processor the tiny image encoder needs (diffusers' default is 224 px, the real ViT-H's size)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor

    vae = AutoencoderKL.from_pretrained(tiny_weights / utils.VAE_DIR)
    pipes = []
    for _ in range(2):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_weights / utils.MODEL_DIRS["illustrious"], vae=vae,
                                                         add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.register_modules(feature_extractor=CLIPImageProcessor(size=32, crop_size=32))
        pipes.append(pipe)
    return pipes


def test_reference_modes_match_diffusers_ip_adapter_and_leave_the_unet_as_it_was(tiny_weights, fresh_pipes, embeds):
    from sdxl import reference
    ours, stock = fresh_pipes
    references = reference.References(tiny_weights)
    model = type("Model", (), {"scheduler_config": dict(ours.scheduler.config)})()
    image = drawn_image((80, 48)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    size = dict(width=SIZE[0], height=SIZE[1], steps=2)
    own_processors = {name: type(p) for name, p in ours.unet.attn_processors.items()}
    plain = latents(ours, model, embeds, **size)

    stock.load_ip_adapter(str(tiny_weights / reference.REFERENCE_DIR), subfolder=reference.ADAPTER_SUBFOLDER,
                          weight_name=reference.ADAPTER_FILE, image_encoder_folder=reference.ENCODER_FOLDER)
    results = {}
    for mode in reference.REFERENCE_MODES:
        request = reference.ReferenceRequest(image=image, strength=0.6, mode=mode)
        with references.attached(ours, request, do_cfg=True) as kwargs:
            results[mode] = latents(ours, model, embeds, **size, **kwargs)
        stock.set_ip_adapter_scale(reference.mode_scale(mode, 0.6))
        assert torch.equal(results[mode], latents(stock, model, embeds, **size, ip_adapter_image=image)), mode
        assert not torch.equal(results[mode], plain), mode
    assert len({tuple(r.flatten()[:64].tolist()) for r in results.values()}) == 3  # three different images
    # Detached: the UNet's own processors, no image projection, and bitwise the plain steps again.
    assert {name: type(p) for name, p in ours.unet.attn_processors.items()} == own_processors
    assert ours.unet.encoder_hid_proj is None and ours.unet.config.encoder_hid_dim_type is None
    assert torch.equal(latents(ours, model, embeds, **size), plain)
    assert references.title.startswith("ip-adapter-plus_sdxl_vit-h [")


def test_reference_inputs_are_checked(tmp_path):
    from sdxl import reference
    good = tmp_path / "ref.png"
    drawn_image().save(good)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(utils.InputError, match="reference_image: expected a PNG, JPEG or WebP image"):
        reference.check_reference(tmp_path / "bad.png", 0.6, "full")
    with pytest.raises(utils.InputError, match="reference_mode: expected one of"):
        reference.check_reference(good, 0.6, "layout")
    with pytest.raises(utils.InputError, match="reference_strength: expected 0 to 1"):
        reference.check_reference(good, 1.5, "full")
    assert reference.check_reference(good, 0.0, "style") is None  # strength 0: exactly no reference
    assert reference.check_reference(good, 0.5, "style").image.size == (64, 64)


def test_input_choices_are_the_tables_they_name():
    from sdxl import reference
    assert predict.CONTROL_TYPE_CHOICES == list(control.CONTROL_TYPES)
    assert control.DEFAULT_CONTROL_TYPE in preprocess.BUILT_IN
    assert sorted(preprocess.BUILT_IN) == sorted(control.CONTROL_TYPES)  # every control type has its preprocessor
    assert predict.REFERENCE_MODE_CHOICES == list(reference.REFERENCE_MODES)


def test_control_with_a_lora_uses_the_merged_unet_and_leaves_it_clean(predictor, file_host):
    from lora_fixtures import write_kohya_lora

    write_kohya_lora(file_host.folder / "control-lora.safetensors", predictor.models.models["illustrious"].txt2img)
    path = file_host.folder / "control-map.png"
    drawn_image((256, 256)).save(path)
    small = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=1, output_format="png",
                 prompt="1girl", seed=6, control_image=path, control_preprocess=False)

    def image(**kwargs):
        (out,) = predictor.predict(**predict_inputs(**small, **kwargs))
        return np.asarray(Image.open(out).convert("RGB"))

    alone = image()
    with_lora = image(lora_weights=f"{file_host.url}/control-lora.safetensors", lora_scale=1.5)
    assert not np.array_equal(with_lora, alone)  # the controlled steps run the LoRA-merged UNet
    assert np.array_equal(image(), alone)  # and the LoRA is out again for the next request


def test_reference_steps_replay_cuda_graphs_keyed_by_the_adapter_scales(predictor):
    """With a reference (alone and with control), every UNet step replays a graph, and a graph captured at one
    strength or mode is never replayed at another: each gives the eager image bit for bit."""
    from cog_server import data_uri

    base = dict(prompt="1girl", aspect_ratio="custom", width=256, height=256, num_inference_steps=2,
                output_format="png", seed=6, reference_image=data_uri(drawn_image((48, 64))))
    cases = {"full 0.6": {}, "full 0.3": dict(reference_strength=0.3), "style 0.6": dict(reference_mode="style"),
             "with control": dict(control_image=data_uri(drawn_image((96, 96))), control_preprocess=False),
             "with hires": dict(hires_scale=1.25, hires_steps=2)}

    def run(case: dict) -> np.ndarray:
        (path,) = predictor.predict(**predict_inputs(**{**base, **case}))
        return np.asarray(Image.open(path).convert("RGB"))

    eager = {name: run(case) for name, case in cases.items()}
    assert not np.array_equal(eager["full 0.6"], eager["full 0.3"])
    model = predictor.models.models["illustrious"]
    use_graphs(predictor, rerun_capture)
    try:
        for name, case in cases.items():
            assert np.array_equal(run(case), eager[name]), name
        assert all(getattr(twin.unet, "eager_calls", 0) == 0 for twin in model.runs.values())
        variants = {key[1] for key in model.runner.graphs if key[0] in ("unet", "unet+control")}
        assert len(variants) == 3 and all(v[0] == "ip-adapter" for v in variants)  # full 0.6 / 0.3, style 0.6
        replays = model.runner.stats["replays"]
        assert np.array_equal(run(cases["full 0.3"]), eager["full 0.3"])  # replayed, not captured again
        assert model.runner.stats["replays"] > replays and model.runner.stats["captures"] == len(model.runner.graphs)
        # Attaching the adapter is not a move of the UNet's weights: a plain request after them keeps every graph.
        plain = run(dict(reference_image=None))
        assert model.runner.stats["dropped"] == 0 and model.runner.stats["captures"] == len(model.runner.graphs)
        assert np.array_equal(run(dict(reference_image=None)), plain)
    finally:
        use_graphs(predictor, None)


def test_every_control_type_through_the_cog_server_with_preprocessing_on_and_off(cog_server):
    """Each control type's built-in preprocessor runs in the server (its tiny model loaded on first use) and the
    infotext names the A1111 module that ran; with control_preprocess=false the image is the map ("none")."""
    import io

    from cog_server import data_uri, decode_output

    small = dict(prompt="1girl", aspect_ratio="custom", width=256, height=256, num_inference_steps=1,
                 output_format="png", seed=3, control_image=data_uri(drawn_image((160, 200))))
    for control_type, spec in control.CONTROL_TYPES.items():
        for preprocess in (True, False):
            result = cog_server.predict({**small, "control_type": control_type, "control_preprocess": preprocess})
            assert result["status"] == "succeeded", (control_type, preprocess, result.get("error"))
            _, payload = decode_output(result["output"][0])
            text = Image.open(io.BytesIO(payload)).info["parameters"]
            module = spec.module if preprocess else "none"
            assert f'ControlNet 0: "Module: {module}, Model: controlnet-union-sdxl-1.0-promax [' in text, text


def test_the_hires_pass_gets_its_map_made_at_its_own_size(predictor):
    """As A1111's "Hr Option: Both": the control image is fitted to the hires size and preprocessed there, not the
    first pass's map enlarged."""
    from cog_server import data_uri

    source = drawn_image((200, 300))
    predictor.predict(**predict_inputs(prompt="1girl", aspect_ratio="custom", width=256, height=256,
                                       num_inference_steps=2, hires_scale=1.5, hires_steps=2, output_format="png",
                                       seed=4, control_image=data_uri(source)))
    step = predictor.models.models["illustrious"].runs[("control", "img2img")].unet.step
    expected = preprocess.canny(control.crop_and_resize(source, (384, 384)))
    assert step.map.size == (384, 384) and np.array_equal(np.asarray(step.map), np.asarray(expected))
