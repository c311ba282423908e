"""Exports opened by the tools users already have (issue 16 items 1, 2, 3, 8): transformers' ``pipeline``,
``AutoModel`` and ``AutoImageProcessor``, timm's ``create_transform``, and an FSDP run launched by ``torchrun``.

The preprocessing reference is mimaim's own probe transform (``data.eval_transform``) on a PIL image
larger than the model input and of another aspect ratio.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mimaim
from mimaim.cli import main
from mimaim.data import IMAGENET_STD, eval_transform
from mimaim.engine.runs import read_record, resolve_checkpoint
from mimaim.eval.features import encode, pool_tokens

from conftest import make_image_folder
from tiny_runs import images, make_run

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

TOL = dict(rtol=0, atol=1e-4)
# transformers' default (torchvision) backend rounds the resized image to uint8: one grey level of the normalised pixels
ONE_LEVEL = 1.01 / 255 / min(IMAGENET_STD)


def picture(width: int = 57, height: int = 45) -> Image.Image:
    """An RGB image with structure (gradients, stripes, noise); 57x45 at 32 px: a 46x37 resize, a 7-pixel crop."""
    yy, xx = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).normal(0, 20, (height, width, 3))
    rgb = np.stack([xx * 255 / width, yy * 255 / height, 127 + 100 * np.sin(xx / 3 + yy / 5)], -1) + noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def protocol_features(encoder, record: dict, x: torch.Tensor) -> torch.Tensor:
    """The run's probe features (its recorded protocol: layers, norm, pool), as ``mimaim probe`` reads them."""
    protocol = record["probe_protocol"]
    tokens = encode(encoder, x, protocol["layers"], protocol["norm"])
    return pool_tokens(tokens, encoder.num_prefix_tokens, protocol["pool"])


HF_CASES = {
    "mae": ("mae", {}),
    "beit": ("beit", {}),
    "simmim-beit-vit": ("simmim", {}),
    "simmim-plain-vit": ("simmim", {"objective_options": {"vit_flavour": "plain"}}),
}


@pytest.mark.parametrize("objective, overrides", list(HF_CASES.values()), ids=list(HF_CASES))
def test_hf_export_runs_in_an_image_feature_extraction_pipeline_with_mimaims_eval_pixels(tmp_path, objective,
                                                                                          overrides):
    run, _ = make_run(tmp_path / "run", objective, **overrides)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--to", "hf", "--out", str(out)]) == 0
    image, ours = picture(), eval_transform(32)(picture())[None]

    exact = transformers.AutoImageProcessor.from_pretrained(out, backend="pil")
    torch.testing.assert_close(exact(image, return_tensors="pt")["pixel_values"], ours, rtol=0, atol=1e-6)
    processor = transformers.AutoImageProcessor.from_pretrained(out)  # the default backend, as pipeline's
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, ours, rtol=0, atol=ONE_LEVEL)

    # HF's ViTMAEModel masks at random (config mask_ratio); at 0 it keeps every patch, in a random order
    kwargs = {"model_kwargs": {"mask_ratio": 0.0}} if objective == "mae" else {}
    pipe = transformers.pipeline("image-feature-extraction", model=str(out), **kwargs)
    features = pipe(image, return_tensors=True)
    encoder = mimaim.load_backbone(run)
    with torch.no_grad():
        expected = encoder.forward_features(pixels)
    if objective == "mae":  # the cls token (MAE's probe feature) and the patch tokens as a set
        torch.testing.assert_close(features[:, 0], expected[:, 0], **TOL)
        torch.testing.assert_close(features[:, 1:].mean(1), expected[:, 1:].mean(1), **TOL)
    else:
        torch.testing.assert_close(features, expected, **TOL)


def test_beit_hf_export_opened_with_automodel_keeps_the_trained_norm_and_gives_the_probe_features(tmp_path):
    run, obj = make_run(tmp_path / "run", "beit")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--to", "hf", "--out", str(out)]) == 0
    model, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "BeitModel"
    assert not info["missing_keys"] and set(info["unexpected_keys"]) == {"lm_head.weight", "lm_head.bias"}
    encoder = mimaim.load_backbone(run)
    record = read_record(resolve_checkpoint(run))
    x = images()
    with torch.no_grad():
        hidden = model.eval()(pixel_values=x).last_hidden_state
        torch.testing.assert_close(hidden, encoder.forward_features(x), **TOL)
        assert record["probe_protocol"]["pool"] == "mean"  # of the patch tokens after the final norm
        torch.testing.assert_close(hidden[:, 1:].mean(1), protocol_features(encoder, record, x), **TOL)

        # the masked-image-modelling head, opened as its README line says: no key left out, the same logits
        mim, info = transformers.BeitForMaskedImageModeling.from_pretrained(out, use_mean_pooling=True,
                                                                             output_loading_info=True)
        assert not any(info.values()), info
        torch.testing.assert_close(mim.eval()(pixel_values=x).logits, obj.lm_head(encoder.forward_features(x)[:, 1:]),
                                   **TOL)


TIMM_CASES = {"mae": ("mae", 32), "aim-48px": ("aim", 48)}


@pytest.mark.parametrize("objective, size", list(TIMM_CASES.values()), ids=list(TIMM_CASES))
@pytest.mark.parametrize("width, height", [(57, 45), (64, 50), (100, 100)])
def test_timm_export_transform_gives_mimaims_eval_pixels(tmp_path, objective, size, width, height):
    run, _ = make_run(tmp_path / "run", objective, img_size=size)
    out = tmp_path / "timm"
    assert main(["export", str(run), "--to", "timm", "--out", str(out)]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    image = picture(width, height)
    torch.testing.assert_close(transform(image), eval_transform(size)(image), rtol=0, atol=1e-6)


@pytest.mark.slow  # a torchrun launch of 2 processes
def test_export_of_an_fsdp_run_launched_by_torchrun(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=8, size=16)
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "-m", "mimaim", "pretrain", "--objective", "mae", "--strategy", "fsdp", "--data",
                    f"imagefolder:{data}", "--model", "vit_micro", "--img-size", "16", "--patch-size", "4",
                    "--batch-size", "4", "--max-steps", "2", "--num-workers", "0", "--device", "cpu",
                    "--precision", "fp32", "--no-progress", "--out", str(run)],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    ckpt = resolve_checkpoint(run)
    assert not (ckpt / "model.safetensors").exists() and list(ckpt.glob("*.distcp"))  # sharded (DCP)

    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(run), "--to", "timm", "--out", str(tmp_path / "timm")]) == 0
    encoder = mimaim.load_backbone(run)
    hf = transformers.ViTMAEModel.from_pretrained(tmp_path / "hf", mask_ratio=0.0).eval()
    tm = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    x = images(size=16)
    noise = torch.arange(encoder.num_patches).float().expand(x.shape[0], -1)  # keeps the patch order
    with torch.no_grad():
        ours = encoder.forward_features(x)
        torch.testing.assert_close(hf(pixel_values=x, noise=noise).last_hidden_state, ours, **TOL)
        torch.testing.assert_close(tm.forward_features(x), ours, **TOL)
