"""The line preprocessors (sdxl/lines.py): softedge (HED), lineart (Informative Drawings), lineart_anime (Anime2Sketch).

Random tiny weights cannot find edges, so where the maps must follow the drawn shapes the networks get hand-set
weights in their real architectures (an edge filter for HED, a darkness pass-through for the two generators): that
checks every layer's wiring and each module's pre- and post-processing (scaling, padding, inversion, resizing) against
the drawing itself. The baked tiny stand-ins are checked for what random weights can show (size, range, determinism,
key layout), through predict() with control_preprocess on and off, and through script/download_weights.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from sdxl import control, lines, preprocess
import utils
from conftest import predict_inputs

TYPES = tuple(lines.LINE_MODELS)
SQUARE = (16, 16, 47, 47)  # the dark square of `drawing`, inclusive corners
BACKGROUND = (240, 236, 228)


def drawing(size=(70, 64)) -> Image.Image:
    """A near-black square on a light background; 70 px wide so that at the 512-px processor resolution the width
    (560) needs padding to 576."""
    image = Image.new("RGB", size, BACKGROUND)
    ImageDraw.Draw(image).rectangle(SQUARE, fill=(12, 10, 14))
    return image


# --- Hand-set weights in the real architectures -----------------------------------------------------------------
def edge_hed() -> lines.SoftEdgeHED:
    """HED whose first block computes |d/dx| + |d/dy| of the grey image (Sobel) less the background colour (its
    learned offset), whose first side output turns that into a positive score above a small gradient, and whose other
    side outputs are 0."""
    net = lines.SoftEdgeHED(widths=(4, 8, 8, 16, 16))
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 3  # /3: the mean of R, G, B
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        first, second = net.block1.convs
        for channel, kernel in enumerate((sobel, -sobel, sobel.T, -sobel.T)):
            first.weight[channel] = kernel  # relu(g) + relu(-g) = |g| for both directions
            second.weight[channel, channel, 1, 1] = 1.0
        net.block1.projection.weight.fill_(1.0)
        net.block1.projection.bias.fill_(-20.0)
        net.norm.copy_(torch.tensor(BACKGROUND, dtype=torch.float32).reshape(1, 3, 1, 1))  # the background is 0,
        # like the zero padding around it: no edge along the image's frame
    return net.eval()


def _center(conv: torch.nn.Module, out: int, into: int, value: float) -> None:
    conv.weight[out, into, conv.weight.shape[2] // 2, conv.weight.shape[3] // 2] = value


def _replicate(transposed: torch.nn.ConvTranspose2d, into: int, out: int, value: float) -> None:
    """A stride-2 transposed convolution (padding 1) that copies input pixel i to output pixels 2i and 2i+1."""
    transposed.weight[into, out, 1:3, 1:3] = value


def dark_informative_drawings() -> lines.InformativeDrawings:
    """The generator passing darkness through channel 0 of every layer (instance norms keep its sign: the dark
    square stays positive, the background goes to 0 at each ReLU), the residual blocks adding 0, and the output a
    sigmoid that is low (a dark line) where darkness is positive."""
    net = lines.InformativeDrawings(width=4, residual=3)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for rgb in range(3):
            _center(net.model0[1], 0, rgb, -1.0 / 3)
        net.model0[1].bias[0] = 1.0  # 1 - grey: darkness in 0-1
        _center(net.model1[0], 0, 0, 1.0)
        _center(net.model1[3], 0, 0, 1.0)
        _replicate(net.model3[0], 0, 0, 1.0)
        _replicate(net.model3[3], 0, 0, 1.0)
        _center(net.model4[1], 0, 0, -20.0)
        net.model4[1].bias[0] = 6.0
    return net.eval()


def dark_anime2sketch() -> lines.Anime2Sketch:
    """The U-Net's outermost level alone: darkness (the 2x2 mean of -grey) down, ReLU, copied back up through the
    skip channel (the inner levels are all zero and their channels weighted 0), tanh low where it is dark."""
    net = lines.Anime2Sketch(width=2, levels=8)
    outer = net.model.model
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for rgb in range(3):
            outer[0].weight[0, rgb, 1:3, 1:3] = -1.0 / 12  # the mean over 2x2 pixels and R, G, B
        _replicate(outer[3], 0, 0, -10.0)
        outer[3].bias[0] = 3.0
    return net.eval()


HAND_SET = {"softedge": edge_hed, "lineart": dark_informative_drawings, "lineart_anime": dark_anime2sketch}


def test_hand_set_networks_put_the_lines_where_the_drawing_has_them():
    image = drawing()
    x0, y0, x1, y1 = SQUARE
    inside = np.zeros((64, 70), bool)
    inside[y0:y1 + 1, x0:x1 + 1] = True
    for control_type in TYPES:
        result = lines.detect_map(control_type, HAND_SET[control_type](), image)
        assert result.size == image.size and result.mode == "RGB"
        pixels = np.asarray(result)
        assert (pixels == pixels[:, :, :1]).all(), control_type  # grey
        grey = pixels[:, :, 0].astype(int)
        far = np.ones_like(inside)  # the background at least 4 px from the square
        far[y0 - 4:y1 + 5, x0 - 4:x1 + 5] = False
        assert grey[far].max() <= 40, control_type  # black away from the drawing ...
        if control_type == "softedge":  # ... soft edges on the outline, none inside the square
            assert grey[y0 + 4:y1 - 3, x0 + 4:x1 - 3].max() <= 40
            # The outline lies between pixels x0 - 1 and x0 (and x1 and x1 + 1): the strongest edge is on one of them
            # in every row and column along the four sides.
            for side in (grey[y0 + 2:y1 - 1, x0 - 1:x0 + 1], grey[y0 + 2:y1 - 1, x1:x1 + 2]):
                assert (side.max(axis=1) >= 150).all()
            for side in (grey[y0 - 1:y0 + 1, x0 + 2:x1 - 1], grey[y1:y1 + 2, x0 + 2:x1 - 1]):
                assert (side.max(axis=0) >= 150).all()
        else:  # ... white lines (A1111's inversion) where the drawing is dark, to within a pixel of its border
            assert grey[y0 + 1:y1, x0 + 1:x1].min() >= 215, control_type


def test_resize_with_pad_is_a1111s():
    pixels = np.asarray(drawing())  # 70 x 64
    padded, keep = lines.resize_with_pad(pixels)
    assert keep == (512, 560) and padded.shape == (512, 576, 3)  # short side 512, width padded to a multiple of 64
    assert (padded[:, 560:] == padded[:, 559:560]).all()  # padded with the edge column
    small, keep = lines.resize_with_pad(np.zeros((1024, 700, 3), np.uint8))
    assert keep == (749, 512) and small.shape == (768, 512, 3)


# --- The real files' architectures ----------------------------------------------------------------------------
REAL_DTYPE = {"softedge": torch.float16, "lineart": torch.float32, "lineart_anime": torch.float32}


def test_architectures_match_the_real_files_and_the_tiny_ones(tiny_weights):
    for control_type, model in lines.LINE_MODELS.items():
        real = {"softedge": lines.SoftEdgeHED, "lineart": lines.InformativeDrawings,
                "lineart_anime": lines.Anime2Sketch}[control_type]
        with torch.device("meta"):
            full = real()  # the defaults are the real files' hyperparameters
        # The pinned pickle holds the tensors (in its dtype) plus a few kB of zip records: the parameter count of the
        # architecture written here accounts for the file's size, to within 64 kB (one 3x3 conv of 64 channels is 147 kB).
        tensor_bytes = sum(v.numel() for v in full.state_dict().values()) * REAL_DTYPE[control_type].itemsize
        pinned = model.source["files"][0]["size"]
        assert 0 < pinned - tensor_bytes < 64_000, (control_type, pinned - tensor_bytes)
        # The tiny stand-in has the same key names as the real layout and rebuilds from its shapes.
        state = load_file(str(tiny_weights / model.source["folder"] / lines.WEIGHTS_FILE))
        assert {t.dtype for t in state.values()} == {REAL_DTYPE[control_type]}
        assert set(lines.strip_data_parallel(state)) == set(full.state_dict()), control_type
        assert lines.check_layout(control_type, lines.strip_data_parallel(state)) is not None
        # Its sizes are read back from the shapes: the rebuilt network holds exactly its tensors.
        net = lines.build_network(control_type, state)
        assert all(torch.equal(net.state_dict()[k], v.float())
                   for k, v in lines.strip_data_parallel(state).items())


def test_a_file_of_another_layout_is_refused_naming_it(tmp_path):
    state = lines.strip_data_parallel(lines.InformativeDrawings(width=4, residual=3).state_dict())
    folder = tmp_path / "lineart"
    folder.mkdir()
    broken = dict(state)
    del broken["model4.1.bias"]
    broken["model3.0.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(broken, str(folder / lines.WEIGHTS_FILE))
    with pytest.raises(utils.WeightsMissingError) as raised:
        lines.load_network("lineart", folder, torch.device("cpu"))
    message = str(raised.value)
    assert str(folder / lines.WEIGHTS_FILE) in message and "missing ['model4.1.bias']" in message
    assert "model3.0.weight" in message and "--only lineart --force" in message
    (folder / lines.WEIGHTS_FILE).write_bytes((folder / lines.WEIGHTS_FILE).read_bytes()[:100])  # cut short
    with pytest.raises(utils.WeightsMissingError, match="--only lineart --force"):
        lines.load_network("lineart", folder, torch.device("cpu"))
    with pytest.raises(utils.WeightsMissingError, match="run script/download_weights"):
        lines.load_network("softedge", tmp_path / "nothing-here", torch.device("cpu"))


# --- The baked tiny networks, through the predictor ------------------------------------------------------------
def test_baked_networks_load_on_first_use_and_give_deterministic_maps(tiny_weights):
    preprocessors = preprocess.Preprocessors(tiny_weights, torch.device("cpu"), torch.float32)  # as setup() makes it
    image = drawing()
    for control_type in TYPES:
        assert control_type not in preprocessors.lines.networks  # nothing loaded before a request needs it
        first = np.asarray(preprocessors.map(control_type, image, True))
        assert control_type in preprocessors.lines.networks
        assert first.shape == (64, 70, 3) and first.dtype == np.uint8 and (first == first[:, :, :1]).all()
        assert first.max() > first.min()  # not a constant map
        assert np.array_equal(np.asarray(preprocessors.map(control_type, image, True)), first)
        assert np.array_equal(np.asarray(preprocessors.map(control_type, image, False)), np.asarray(image))
    assert set(TYPES) <= set(preprocess.BUILT_IN)
    for control_type in TYPES:  # the infotext's Module is the A1111 name of what runs
        assert control.CONTROL_TYPES[control_type].module == lines.LINE_MODELS[control_type].module
        assert control.CONTROL_TYPES[control_type].processor_res == lines.PROCESSOR_RES


def test_preprocess_on_through_predict_is_the_image_of_its_map_with_preprocess_off(predictor, tmp_path):
    photo = tmp_path / "drawing.png"
    drawing((256, 256)).save(photo)  # already the output size: crop-and-resize leaves it as it is
    small = dict(aspect_ratio="custom", width=256, height=256, num_inference_steps=1, output_format="png",
                 prompt="1girl", seed=5, control_image=photo)

    def image(**kwargs):
        (out,) = predictor.predict(**predict_inputs(**{**small, **kwargs}))
        return np.asarray(Image.open(out).convert("RGB")), utils.read_parameters(out)

    results = {}
    for control_type in TYPES:
        results[control_type], text = image(control_type=control_type)
        module = control.CONTROL_TYPES[control_type].module
        assert f'ControlNet 0: "Module: {module}, Model: controlnet-union-sdxl-1.0-promax [' in text
        assert "Processor Res: 512," in text and "Pixel Perfect: False," in text
    assert not np.array_equal(results["lineart"], results["softedge"])  # each type its own map (and mode)
    # With preprocessing off and the map itself given, the image is exactly the preprocessed one (a run of the
    # ControlNet on the map, not on the drawing: test_control.py shows the control changes the image).
    detected = tmp_path / "map.png"
    drawn_map = predictor.preprocessors.map("lineart_anime", Image.open(photo).convert("RGB"), True)
    assert not np.array_equal(np.asarray(drawn_map), np.asarray(Image.open(photo).convert("RGB")))
    drawn_map.save(detected)
    off, text = image(control_type="lineart_anime", control_image=detected, control_preprocess=False)
    assert np.array_equal(off, results["lineart_anime"])
    assert "Module: none," in text and "Processor Res: 256," in text and "Pixel Perfect: True," in text


# --- script/download_weights ----------------------------------------------------------------------------------------
class NotATensor:
    """A global a weights-only unpickler must refuse."""


def test_download_weights_converts_the_pinned_pickles_and_refuses_others(tiny_weights, tmp_path, monkeypatch):
    """Each component against a fake Hub serving the tiny state dicts as pickles under the real Annotators names:
    a file that is not the pinned one is refused before conversion, a pickle carrying anything but tensors is refused
    by the weights-only loader, and the pinned ones are written as safetensors with the same tensors, load, and pass
    --check offline; nothing else is kept."""
    from fakes import FakeHFHub
    from test_hf_download import _load_script

    script = _load_script()
    pickles = {}
    for control_type, model in lines.LINE_MODELS.items():
        buffer = io.BytesIO()
        torch.save(load_file(str(tiny_weights / model.source["folder"] / lines.WEIGHTS_FILE)), buffer)
        pickles[control_type] = buffer.getvalue()
    evil = io.BytesIO()
    torch.save({"model0.1.weight": torch.zeros(2), "payload": NotATensor()}, evil)
    dest = tmp_path / "weights"

    def pin(control_type: str, data: bytes) -> None:
        path = script.SOURCES[control_type]["files"][0]
        monkeypatch.setitem(script.PINS, control_type, {"commit": lines.ANNOTATORS_REVISION, "files": {
            path: (len(data), hashlib.sha256(data).hexdigest())}})

    with FakeHFHub() as hub:
        for control_type, model in lines.LINE_MODELS.items():
            hub.add_file(lines.ANNOTATORS_REPO, model.source["files"][0]["path"], pickles[control_type], lfs=True)
        hub.add_file(lines.ANNOTATORS_REPO, "sk_model2.pth", pickles["lineart"], lfs=True)  # never asked for
        hub.set_commit(lines.ANNOTATORS_REPO, lines.ANNOTATORS_REVISION)
        for name, value in (("HF_ENDPOINT", hub.url), ("NO_PROXY", "127.0.0.1,localhost"),
                            ("HF_HOME", str(tmp_path / "hf-home")), ("HF_HUB_DISABLE_XET", "1")):
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("HF_TOKEN", raising=False)

        # The real pins: the tiny file is another file, refused with both hashes before anything is converted.
        with pytest.raises(script.DownloadError, match="pinned sha256 mismatch: lllyasviel/Annotators/sk_model.pth"):
            script.install("lineart", dest, script.Hub, force=False)
        assert not list(dest.iterdir())
        # A pinned file that is not plain tensors: the weights-only loader refuses it; nothing is kept.
        hub.add_file(lines.ANNOTATORS_REPO, "sk_model.pth", evil.getvalue(), lfs=True)
        pin("lineart", evil.getvalue())
        with pytest.raises(script.DownloadError, match="weights_only=True"):
            script.install("lineart", dest, script.Hub, force=False)
        assert not list(dest.iterdir())

        hub.add_file(lines.ANNOTATORS_REPO, "sk_model.pth", pickles["lineart"], lfs=True)
        for control_type in TYPES:
            pin(control_type, pickles[control_type])
            script.install(control_type, dest, script.Hub, force=False)
        fetched = {r.path for r in hub.requests if "/resolve/" in r.path}
        assert all(f"/resolve/{lines.ANNOTATORS_REVISION}/" in p for p in fetched) and not any(
            p.endswith("sk_model2.pth") for p in fetched)

    for control_type, model in lines.LINE_MODELS.items():
        folder = dest / model.source["folder"]
        assert sorted(p.name for p in folder.iterdir()) == ["MANIFEST.json", lines.WEIGHTS_FILE]  # no pickle
        want = load_file(str(tiny_weights / model.source["folder"] / lines.WEIGHTS_FILE))
        got = load_file(str(folder / lines.WEIGHTS_FILE))
        assert got.keys() == want.keys() and all(
            got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in want.items())  # names, dtypes unchanged
        origin = json.loads((folder / "MANIFEST.json").read_text())["origin"][model.source["files"][0]["path"]]
        assert origin["checked"] == "pinned-sha256" and origin["written_as"] == lines.WEIGHTS_FILE
        lines.load_network(control_type, folder, torch.device("cpu"))
    only = [arg for name in TYPES for arg in ("--only", name)]
    assert script.main(["--dest", str(dest), "--check", *only]) == 0
    (dest / lines.LINEART_DIR / "sk_model.pth").write_bytes(pickles["lineart"])  # a pickle left beside it
    assert script.main(["--dest", str(dest), "--check", *only]) == 1
