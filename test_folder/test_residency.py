"""Which modules stay in accelerator memory: only the active model's (utils.placement / make_resident)."""

from __future__ import annotations

import pytest

import utils


def test_only_the_active_models_modules_stay_on_the_accelerator(predictor):
    models = predictor.models.models
    keep, away = utils.placement(models, "illustrious")
    ids = lambda mods: {id(m) for m in mods}  # noqa: E731
    illustrious, sdxl = models["illustrious"].txt2img, models["sdxl"].txt2img
    assert ids(keep) == ids([illustrious.unet, illustrious.text_encoder, illustrious.text_encoder_2,
                             illustrious.vae])
    # The shared VAE is the active model's too: it never leaves; SDXL base's own modules do.
    assert illustrious.vae is sdxl.vae and id(sdxl.vae) not in ids(away)
    assert ids(away) == ids([sdxl.unet, sdxl.text_encoder, sdxl.text_encoder_2])
    keep, away = utils.placement(models, None)  # before a custom checkpoint loads: everything out
    assert keep == [] and id(sdxl.vae) in ids(away) and id(illustrious.unet) in ids(away)


def test_on_the_cpu_nothing_moves(predictor):
    if predictor.models.device.type != "cpu":
        pytest.skip("runs where the predictor chose the CPU")
    assert utils.make_resident(predictor.models, "sdxl") is False
    assert next(predictor.models.models["sdxl"].txt2img.unet.parameters()).device.type == "cpu"
