"""control_model (issue 16): any SDXL ControlNet by reference, on the tiny model.

The ControlNets are written here from the tiny UNet's config (script/tiny_weights.py: a plain ControlNetModel, SD1.5-
and Flux-shaped refusal cases; the baked tiny union model as it is) and served by the loopback fakes as users link
them: a diffusers folder on the Hub, a single .safetensors file by URL, a CivitAI "Controlnet" model holding the file
in the original ControlNet (ldm) names. Checked: the baked union model given by reference makes exactly the baked
image on both base models and across switches; a plain ControlNet runs exactly as stock diffusers'
StableDiffusionXLControlNetPipeline (eager and replaying graphs), the same from each layout; strength 0 fetches
nothing and is the plain image; files for other bases or of other kinds are refused at download, naming
control_model, and never cached; LoRAs never touch the ControlNet; the real Cog server takes the input.
"""

from __future__ import annotations

import gc
import json
import pickle
import re
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save, save_file

import utils
import weights
from conftest import REPO, predict_inputs
from fakes import FakeCivitai, FakeHFHub, FakeServer
from ldm_checkpoint import convert_unet
from lora_fixtures import write_foreign_lora, write_kohya_lora
from sdxl import control, prompts

sys.path.insert(0, str(REPO / "script"))
import tiny_weights  # noqa: E402

SMALL = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=1, output_format="png",
             prompt="1girl, red hat", seed=3, control_preprocess=False)


def drawn_map(size=(256, 256)) -> Image.Image:
    """A line-art-like control map: white strokes on black."""
    image = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle((w // 4, h // 4, w // 2, h // 2), outline=(255, 255, 255), width=4)
    draw.line((w // 2, h - 8, w - 8, h // 2), fill=(255, 255, 255), width=5)
    return image


def controlnet_to_ldm(state: dict, unet_config: dict) -> dict:
    """A diffusers ControlNet state dict in the original ControlNet layout ("control_model." + ldm names): the UNet
    half by ldm_checkpoint.convert_unet (the inverse of diffusers' converter), the hint encoder as input_hint_block
    (convs at 0, 2, ..., 12 and 14), the zero convolutions as zero_convs / middle_block_out, SDXL's text-time
    embedding as label_emb."""
    out, unet_part = {}, {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module.startswith("controlnet_cond_embedding."):
            part = module.split(".", 1)[1]
            index = {"conv_in": 0, "conv_out": 14}.get(part) if not part.startswith("blocks.") else \
                2 * (int(part.split(".")[1]) + 1)
            out[f"input_hint_block.{index}.{param}"] = value
        elif module.startswith("controlnet_down_blocks."):
            out[f"zero_convs.{module.split('.')[1]}.0.{param}"] = value
        elif module == "controlnet_mid_block":
            out[f"middle_block_out.0.{param}"] = value
        else:
            unet_part[key] = value
    out.update(convert_unet(unet_part, unet_config))
    return {"control_model." + k: v.contiguous() for k, v in out.items()}


def image(predictor, **overrides) -> tuple[np.ndarray, str]:
    (path,) = predictor.predict(**predict_inputs(**{**SMALL, **overrides}))
    return np.asarray(Image.open(path).convert("RGB")), utils.read_parameters(path) or ""


def unit_model(text: str) -> str:
    """The ControlNet unit's "Model" field in an A1111 infotext."""
    return re.search(r'ControlNet 0: "[^"]*Model: ([^,]+),', text)[1]


@pytest.fixture(scope="module")
def cn(predictor, tmp_path_factory):
    """The ControlNet files, served by a fake Hub, CivitAI and file host; the predictor's ControlNet cache in a
    folder of this module's."""
    root = tmp_path_factory.mktemp("control-model")
    weights_dir = predictor.weights_dir
    unet_dir = weights_dir / utils.MODEL_DIRS["illustrious"] / "unet"
    unet_config = json.loads((unet_dir / "config.json").read_text())
    tiny_weights.build_plain_controlnet(root / "plain", unet_dir, seed=29)
    tiny_weights.build_plain_controlnet(root / "plain16", unet_dir, seed=29, dtype=torch.float16)
    wide_unet = root / "wide-unet"  # an SDXL-shaped ControlNet for a UNet of other channels
    wide_unet.mkdir()
    (wide_unet / "config.json").write_text(json.dumps({**unet_config, "block_out_channels": [32, 64, 64]}))
    tiny_weights.build_plain_controlnet(root / "wide", wide_unet, seed=31)
    for kind in ("sd15", "flux"):
        tiny_weights.write_foreign_controlnet(root / f"{kind}.safetensors", kind)
    pipe = predictor.models.models["illustrious"].txt2img
    write_kohya_lora(root / "lora.safetensors", pipe, seed=5)
    write_foreign_lora(root / "checkpoint.safetensors", pipe, "checkpoint")

    union_dir = weights_dir / control.CONTROLNET_DIR
    union = (union_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    plain = (root / "plain" / "diffusion_pytorch_model.safetensors").read_bytes()
    ldm = save(controlnet_to_ldm(load_file(str(root / "plain" / "diffusion_pytorch_model.safetensors")),
                                 unet_config))
    six = load_file(str(union_dir / "diffusion_pytorch_model.safetensors"))  # a non-promax union: 6 control types
    six["task_embedding"] = six["task_embedding"][:6].contiguous()
    width = unet_config["addition_time_embed_dim"]
    six["control_add_embedding.linear_1.weight"] = six["control_add_embedding.linear_1.weight"][:, :6 * width].contiguous()

    mp = pytest.MonkeyPatch()
    hub, civitai, files = FakeHFHub().start(), FakeCivitai().start(), FakeServer().start()
    for name, value in (("HF_ENDPOINT", hub.url), ("CIVITAI_API_BASE", civitai.url), ("NO_PROXY", "127.0.0.1,localhost"),
                        ("HF_HOME", str(root / "hf-home")), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        mp.setenv(name, value)
    mp.setattr(weights, "RETRY_BACKOFF", 0.01)
    cache = weights.ControlNetCache(root / "cache")
    mp.setitem(predictor.caches, "ControlNet", cache)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        hub.add_file("acme/union", name, (union_dir / name).read_bytes())
        hub.add_file("acme/plain", name, (root / "plain" / name).read_bytes())
        hub.add_file("acme/plain-variants", name, (root / "plain" / name).read_bytes())
    hub.add_file("acme/plain-variants", "diffusion_pytorch_model.fp16.safetensors",
                 (root / "plain16" / "diffusion_pytorch_model.safetensors").read_bytes())
    hub.add_file("acme/plain-variants", "diffusion_pytorch_model.bin", pickle.dumps({"not": "loaded"}))
    hub.add_file("acme/flux-cn", "diffusion_pytorch_model.safetensors", (root / "flux.safetensors").read_bytes())
    civitai.add_version(501, 5001, ldm, model_type="Controlnet", base_model="SDXL 1.0",
                        file_name="my_plain_cn.safetensors")
    civitai.add_version(502, 5002, (root / "checkpoint.safetensors").read_bytes(), model_type="Controlnet")
    civitai.add_version(503, 5003, plain, model_type="LORA")
    partial = load_file(str(root / "plain" / "diffusion_pytorch_model.safetensors"))
    del partial["controlnet_mid_block.weight"]
    served = {"union_promax.safetensors": union, "cn_plain.safetensors": plain, "six.safetensors": save(six),
              "partial.safetensors": save(partial),
              "wide.safetensors": (root / "wide" / "diffusion_pytorch_model.safetensors").read_bytes(),
              "lora.safetensors": (root / "lora.safetensors").read_bytes(),
              "sd15.safetensors": (root / "sd15.safetensors").read_bytes(),
              "pickle.safetensors": pickle.dumps({"state_dict": {"control_model.x": [0.0] * 8}})}
    url = {name.split(".")[0]: files.add_file(f"/cn/{name}", body) for name, body in served.items()}
    map_path = root / "map.png"
    drawn_map().save(map_path)
    try:
        yield SimpleNamespace(root=root, cache=cache, url=url, map=map_path, union_file=union_dir /
                              "diffusion_pytorch_model.safetensors", plain=plain, ldm=ldm,
                              plain16=(root / "plain16" / "diffusion_pytorch_model.safetensors").read_bytes(),
                              hf_union="hf://acme/union", hf_plain="https://huggingface.co/acme/plain",
                              civitai_ldm="https://civitai.com/models/501?modelVersionId=5001")
    finally:
        mp.undo()
        for server in (hub, civitai, files):
            server.stop()


def test_the_baked_union_model_by_reference_is_the_baked_image_on_both_base_models(predictor, cn):
    """An independent check of loading by reference (the architecture read from the tensors, a strict load into a
    model built without memory): the baked union model's own files, as a Hub folder or one file by URL, make
    bitwise the image that diffusers' from_pretrained of the baked folder makes, on either base model and after
    switching between them."""
    hash_ = control.legacy_model_hash(cn.union_file)
    baked = {}
    for sdxl, refs in ((False, (cn.hf_union, cn.url["union_promax"])), (True, (cn.url["union_promax"],)),
                       (False, (cn.url["union_promax"],))):
        if sdxl not in baked:
            baked[sdxl], text = image(predictor, control_image=cn.map, use_standard_sdxl=sdxl)
            assert unit_model(text) == f"{control.CONTROLNET_TITLE} [{hash_}]"
        for ref in refs:
            got, text = image(predictor, control_image=cn.map, use_standard_sdxl=sdxl, control_model=ref)
            assert np.array_equal(got, baked[sdxl]), (sdxl, ref)
            # A1111's "name [hash]": the repo's name for a folder, the file's name for a file
            assert unit_model(text) == f"{'union' if ref == cn.hf_union else 'union_promax'} [{hash_}]"
    assert not np.array_equal(baked[False], baked[True])
    assert len(predictor.controlnets.users) == 1  # the folder's model made way for the file's


@pytest.fixture(scope="module")
def embeds(predictor):
    model = predictor.models.models["illustrious"]
    return prompts.encode_prompts(model.txt2img, "1girl, red hat", "lowres", clip_skip=2).as_pipeline_kwargs()


def test_a_plain_controlnet_steps_as_stock_diffusers_controlnet_pipeline_eager_and_graphed(predictor, cn, embeds):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from test_graphs import rerun_capture, use_graphs

    model = predictor.models.models["illustrious"]
    ref = weights.parse_ref(cn.url["cn_plain"], "ControlNet", input_name="control_model")
    file = cn.cache.fetch(ref, weights.Tokens(), input_name="control_model")
    cn.cache.release(ref)
    user = predictor.controlnets.user(file, model.txt2img.unet.config, "canny")
    assert type(user.model) is ControlNetModel
    size = (64, 64)
    request = control.ControlRequest(image=drawn_map(size), type="canny", preprocess=False, strength=0.8, start=0.0,
                                     end=0.7)  # of 3 steps the first two lie inside the window

    def latents(pipe, **kwargs) -> torch.Tensor:
        pipe.scheduler = utils.make_scheduler("Euler", model.scheduler_config)
        with torch.no_grad():
            return pipe(**embeds, num_inference_steps=3, guidance_scale=6.0, width=size[0], height=size[1],
                        generator=torch.Generator().manual_seed(4), output_type="latent", **kwargs).images

    def ours() -> torch.Tensor:
        run = control.ControlRun(request=request, controlnet=user.model, map=request.image, label=user.label)
        return latents(control.pipeline(model, "txt2img", False, run, size))

    stock = StableDiffusionXLControlNetPipeline.from_pipe(
        model.txt2img, controlnet=ControlNetModel.from_pretrained(cn.root / "plain"), add_watermarker=False)
    stock.set_progress_bar_config(disable=True)
    theirs = latents(stock, image=request.image, controlnet_conditioning_scale=0.8, control_guidance_start=0.0,
                     control_guidance_end=0.7)
    eager = ours()
    assert torch.equal(eager, theirs)
    assert model.runs[("control", "txt2img")].unet.controlled_calls == 2
    assert not torch.equal(eager, latents(model.pipeline("txt2img")))
    use_graphs(predictor, rerun_capture)
    try:
        assert torch.equal(ours(), eager)
        assert {key[0] for key in model.runner.graphs} == {f"controlnet:{user.label}", "unet+control", "unet"}
        assert model.runs[("control", "txt2img")].unet.eager_calls == 0
        control.forget(user)  # what ControlNets.user does to the one it lets go: its graphs go, the UNet's stay
        assert {key[0] for key in model.runner.graphs} == {"unet+control", "unet"}
        assert model.runs[("control", "txt2img")].unet.controlnet is None
    finally:
        use_graphs(predictor, None)


def test_a_plain_controlnet_by_reference_in_each_layout_and_source(predictor, cn):
    plain, _ = image(predictor)
    baked, _ = image(predictor, control_image=cn.map)
    hub, text = image(predictor, control_image=cn.map, control_model=cn.hf_plain)
    first = weakref.ref(predictor.controlnets.users[next(iter(predictor.controlnets.users))].model)
    assert not np.array_equal(hub, plain) and not np.array_equal(hub, baked)
    assert unit_model(text) == f"plain [{control.legacy_model_hash(cn.root / 'plain' / 'diffusion_pytorch_model.safetensors')}]"
    # the same weights as one file in diffusers names, and in the original ControlNet names from CivitAI
    assert np.array_equal(image(predictor, control_image=cn.map, control_model=cn.url["cn_plain"])[0], hub)
    civitai, text = image(predictor, control_image=cn.map, control_model=cn.civitai_ldm)
    assert np.array_equal(civitai, hub)
    ldm_file = cn.root / "ldm.safetensors"
    ldm_file.write_bytes(cn.ldm)
    assert unit_model(text) == f"my_plain_cn [{control.legacy_model_hash(ldm_file)}]"
    gc.collect()
    assert first() is None  # one user ControlNet is kept loaded: the earlier ones are let go, graphs and all
    # strength 0 is the plain image and fetches nothing (this file would be refused if it were fetched)
    entries = cn.cache.stats["entries"]
    off, _ = image(predictor, control_image=cn.map, control_strength=0.0, control_model=cn.url["sd15"])
    assert np.array_equal(off, plain) and cn.cache.stats["entries"] == entries
    # a Hub repo with float32, fp16 and pickle weights: the fp16 file is fetched (half the download)
    ref = weights.parse_ref("hf://acme/plain-variants", "ControlNet", input_name="control_model")
    file = cn.cache.fetch(ref, weights.Tokens(), input_name="control_model")
    cn.cache.release(ref)
    assert sorted(p.name for p in file.path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert (file.path / "diffusion_pytorch_model.safetensors").read_bytes() == cn.plain16


@pytest.mark.parametrize("variant", [
    dict(transformer_layers_per_block=(1, 0, 1)),  # diffusers' -mid SDXL ControlNets: an attention of 0 layers
    dict(down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"), mid_block_type="UNetMidBlock2D"),
    dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")),  # the mid block keeps attention
], ids=["mid", "small", "last-block-plain"])
def test_the_architecture_is_read_from_the_tensors(predictor, tmp_path, variant):
    """ControlNets with fewer transformer layers or attention blocks than the UNet load as from_pretrained loads
    their folder: the same config and the same tensors, with no config.json given."""
    from diffusers import ControlNetModel

    unet_config = predictor.models.models["illustrious"].txt2img.unet.config
    torch.manual_seed(37)
    model = ControlNetModel(**{name: unet_config[name] for name in tiny_weights.CONTROLNET_UNET_FIELDS
                               if name not in variant}, **variant, conditioning_embedding_out_channels=(4, 8, 8, 16))
    model.save_pretrained(tmp_path)
    expected = ControlNetModel.from_pretrained(tmp_path)
    ref = weights.parse_ref(f"https://x.test/{variant and 'v'}.safetensors", "ControlNet", input_name="control_model")
    file = SimpleNamespace(ref=ref, path=tmp_path / "diffusion_pytorch_model.safetensors", sha256="-", file_name=None)
    got = control.load_user_controlnet(file, "k", unet_config, {}, torch.device("cpu"), torch.float32).model
    differ = {k for k in expected.config if not k.startswith("_") and expected.config[k] != got.config.get(k)}
    assert differ <= {"transformer_layers_per_block"}  # only entries of blocks without attention, which none reads
    assert [d for d, t in zip(got.config.transformer_layers_per_block, got.config.down_block_types)
            if t.startswith("CrossAttn")] == [d for d, t in zip(expected.config.transformer_layers_per_block,
                                                                expected.config.down_block_types) if t.startswith("CrossAttn")]
    state = expected.state_dict()
    assert set(got.state_dict()) == set(state)
    assert all(torch.equal(value, state[key]) for key, value in got.state_dict().items())


def test_loras_merge_into_the_unet_never_into_the_controlnet(predictor, cn):
    alone, _ = image(predictor, control_image=cn.map, control_model=cn.url["cn_plain"])
    with_lora, _ = image(predictor, control_image=cn.map, control_model=cn.url["cn_plain"],
                         lora_weights=cn.url["lora"], lora_scale=1.5)
    assert not np.array_equal(with_lora, alone)
    (user,) = predictor.controlnets.users.values()
    file = load_file(str(cn.root / "plain" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(value, file[key]) for key, value in user.model.state_dict().items())
    assert np.array_equal(image(predictor, control_image=cn.map, control_model=cn.url["cn_plain"])[0], alone)


REFUSED = [  # (control_model, the message after "control_model: ", refused at download: nothing may be cached)
    ("sd15", r"is not an SDXL ControlNet \(expected an SDXL ControlNet .*; got an SD1\.x ControlNet", True),
    ("hf://acme/flux-cn", r"is not an SDXL ControlNet .*got a Flux ControlNet \(a transformer\)", True),
    ("lora", r"is not an SDXL ControlNet .*got a LoRA, not a ControlNet: use lora_weights", True),
    ("https://civitai.com/models/502?modelVersionId=5002", r"got a full checkpoint \(it has a UNet\)", True),
    ("https://civitai.com/models/503", r"is not a ControlNet \(expected a Controlnet model; got a LORA model\)", True),
    ("pickle", r"is not a usable ControlNet file .*got a Python pickle", True),
    ("data:application/octet-stream;base64,AAAA", r"data: URLs are not ControlNets", True),
    ("wide", r"is not a ControlNet for this base model \(expected an SDXL ControlNet with block_out_channels "
             r"\[16, 32, 32\]; got block_out_channels \[32, 64, 64\]\)", False),
    ("partial", r"does not load as an SDXL ControlNet \(expected the weights of a ControlNetModel; got 1 missing, "
                r"e\.g\. 'controlnet_mid_block\.weight', and 0 unexpected", False),
    ("six", r"cannot do control_type tile \(expected a union ControlNet with mode 6.*got a union model of 6 "
            r"control types\)", False),
]


@pytest.mark.parametrize("ref, says, at_download", REFUSED, ids=[r[0].split("/")[-1][:20] for r in REFUSED])
def test_controlnets_for_other_bases_and_other_files_are_refused_naming_control_model(predictor, cn, ref, says,
                                                                                       at_download):
    name, ref = ref, cn.url.get(ref, ref)
    before = dict(cn.cache.stats)
    with pytest.raises((weights.WeightsError, utils.InputError)) as caught:
        image(predictor, control_image=cn.map, control_model=ref, control_type="tile")
    assert re.match(rf"control_model: .*{says}", str(caught.value)), str(caught.value)
    assert list((cn.cache.root / "tmp").iterdir()) == []
    if at_download or name == "partial":  # a file that does not load is dropped from the cache again
        assert cn.cache.stats["entries"] == before["entries"] and cn.cache.stats["bytes"] == before["bytes"]


def test_control_model_needs_a_control_image(predictor, cn):
    with pytest.raises(utils.InputError, match="control_model: a ControlNet controls with a control_image; got "
                                               "control_model without one"):
        image(predictor, control_model=cn.url["cn_plain"])


@pytest.mark.parametrize("keys, says", [
    ({"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.weight": [4, 32]}, "ControlNet-LLLite"),
    ({"lora_controlnet": [1], "input_hint_block.0.weight": [16, 3, 3, 3]}, "Control-LoRA"),
    ({"adapter.body.0.resnets.0.block1.weight": [32, 32, 3, 3]}, "T2I-Adapter"),
    ({"image_proj.proj.weight": [8, 8], "ip_adapter.1.to_k_ip.weight": [8, 8]}, "IP-Adapter"),
    ({"pos_embed_input.proj.weight": [8, 16, 2, 2], "transformer_blocks.0.attn.to_q.weight": [8, 8]}, "SD3 ControlNet"),
    ({"decoder.conv_in.weight": [8, 4, 3, 3], "encoder.conv_in.weight": [8, 3, 3, 3]}, "a VAE"),
    ({"conv_in.weight": [8, 4, 3, 3], "up_blocks.0.resnets.0.conv1.weight": [8, 8, 3, 3]}, "a UNet"),
    ({"control_model.input_hint_block.0.weight": [16, 3, 3, 3],  # an SD1.5 ControlNet in the original layout
      "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [320, 768]}, "an SD1.x ControlNet"),
    ({"control_model.input_hint_block.0.weight": [16, 3, 3, 3]}, "without SDXL's text-time embedding"),
    ({"controlnet_cond_embedding.conv_in.weight": [16, 4, 3, 3], "add_embedding.linear_1.weight": [64, 112]},
     "4-channel control maps"),
    ({"controlnet_cond_embedding.conv_in.weight": [16, 3, 3, 3], "add_embedding.linear_1.weight": [64, 112],
      "task_embedding": [8, 16]}, None),
    ({"control_model.input_hint_block.0.weight": [16, 3, 3, 3], "control_model.label_emb.0.0.weight": [64, 112]},
     None),
])
def test_controlnet_files_are_told_apart_by_their_keys(keys, says):
    what = weights.describe_controlnet_keys({k: {"shape": v} for k, v in keys.items()})
    assert what is None if says is None else says in what


def test_control_model_through_the_cog_server(cog_server, file_host, cn):
    from cog_server import data_uri, decode_output
    import io

    (file_host.folder / "cn_plain.safetensors").write_bytes(cn.plain)
    (file_host.folder / "cn_sd15.safetensors").write_bytes((cn.root / "sd15.safetensors").read_bytes())
    inputs = {"prompt": "1girl", "aspect_ratio": "custom", "width": 256, "height": 256, "num_inference_steps": 1,
              "output_format": "png", "seed": 2, "control_image": data_uri(drawn_map()), "control_preprocess": False}
    result = cog_server.predict({**inputs, "control_model": f"{file_host.url}/cn_plain.safetensors"})
    assert result["status"] == "succeeded", result.get("error")
    text = Image.open(io.BytesIO(decode_output(result["output"][0])[1])).info["parameters"]
    assert unit_model(text) == f"cn_plain [{control.legacy_model_hash(file_host.folder / 'cn_plain.safetensors')}]"
    failed = cog_server.predict({**inputs, "control_model": f"{file_host.url}/cn_sd15.safetensors"})
    assert failed["status"] == "failed"
    assert re.search(r"control_model: .* is not an SDXL ControlNet .*got an SD1\.x ControlNet", failed["error"])
