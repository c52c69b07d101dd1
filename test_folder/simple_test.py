"""Quick functionality test: the predictor sets up on the tiny model and writes one image."""

from PIL import Image

from conftest import predict_inputs


def test_one_image_from_a_prompt(predictor):
    paths = predictor.predict(**predict_inputs(prompt="1girl, red hat", aspect_ratio="custom", width=256, height=256,
                                               num_inference_steps=2, seed=1))
    assert [p.name for p in paths] == ["out-0.webp"]
    image = Image.open(paths[0])
    assert image.format == "WEBP" and image.size == (256, 256)
