"""Tests of the Aligner model, its self-supervised training and align() at full resolution."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from stnkit.data.images import builtin_photos
from stnkit.data.pairs import WarpRanges, batch_pairs
from stnkit.models.aligner import Aligner, AlignmentResult
from stnkit.models.checkpoint import load_checkpoint, load_model, save_checkpoint, shipped_models
from stnkit.models.registry import build_model, register_model
from stnkit.training.aligner_training import corner_loss, train_aligner

TINY = {"size": (32, 32), "channels": (8, 16, 32), "iterations": 1}
TRANSLATION = WarpRanges(rotation=0.0, scale=(1.0, 1.0), shear=0.0, translation=0.25)


@pytest.fixture(scope="module")
def camera() -> list[np.ndarray]:
    return [dict(builtin_photos("train"))["camera"]]


@pytest.fixture(scope="module")
def trained(camera, tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("aligner-run")
    model = train_aligner(
        camera, "affine", out, steps=300, batch_size=16, lr=5e-3, ranges=TRANSLATION, photometric=False,
        eval_every=100, checkpoint_every=100, val_pairs=32, progress=False, **TINY,
    )
    return model, out


def test_short_training_recovers_a_synthetic_translation(trained, camera):
    model, _ = trained
    held = batch_pairs(camera, 64, "affine", (32, 32), TRANSLATION, False, rng=123)  # pairs never trained on
    with torch.no_grad():
        predicted = corner_loss(model, model(held.input, held.support), held).mean().item()
    identity = corner_loss(model, model.transform.identity(64), held).mean().item()
    assert predicted < 0.5 * identity, (predicted, identity)


def test_training_writes_run_files_and_refuses_to_clobber(trained, camera):
    model, out = trained
    for name in ("aligner.safetensors", "metrics.csv", "loss.png", "checkpoints/last.safetensors", "checkpoints/best.safetensors"):
        assert (out / name).is_file(), name
    state = load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert state.trainer_state["step"] == 300 and state.optimizer_state is not None
    assert isinstance(load_model(out / "aligner.safetensors"), Aligner)
    with pytest.raises(FileExistsError, match="resume=True or overwrite=True"):
        train_aligner(camera, "affine", out, steps=1, progress=False, **TINY)


def test_resume_continues_from_the_last_checkpoint(camera, tmp_path):
    args = dict(batch_size=2, eval_every=2, checkpoint_every=2, val_pairs=4, progress=False, **TINY)
    train_aligner(camera, "projective", tmp_path, steps=2, **args)
    with pytest.raises(ValueError, match="not an aligner of family 'affine'"):
        train_aligner(camera, "affine", tmp_path, steps=4, resume=True, **args)
    train_aligner(camera, "projective", tmp_path, steps=4, resume=True, **args)
    assert load_checkpoint(tmp_path / "checkpoints" / "last.safetensors").trainer_state["step"] == 4
    steps = [line.split(",")[0] for line in (tmp_path / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == ["0", "2", "4"]
    last = tmp_path / "checkpoints" / "last.safetensors"
    finetuned = train_aligner(camera, "projective", tmp_path / "finetune", steps=1, init=last, **args)
    assert load_checkpoint(tmp_path / "finetune" / "checkpoints" / "last.safetensors").trainer_state["step"] == 1
    assert isinstance(finetuned, Aligner)
    with pytest.raises(ValueError, match="not an aligner of family 'tps'"):
        train_aligner(camera, "tps", tmp_path / "wrong", steps=1, init=last, **args)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        train_aligner(camera, "projective", tmp_path / "empty", steps=1, resume=True, **args)


def test_tps_training_step_with_photometric_loss(camera, tmp_path):
    model = train_aligner(camera, "tps", tmp_path, steps=2, batch_size=2, val_pairs=2, photometric_weight=1.0,
                          photometric_kind="ncc", progress=False, **TINY)
    result = model.align(np.zeros((40, 50), np.uint8), np.zeros((30, 20, 3), np.uint8))
    assert result.matrix is None and result.image.shape == (30, 20)


@pytest.fixture(scope="module")
def aligner() -> Aligner:
    if "aligner-projective" in shipped_models():
        return Aligner.pretrained()
    torch.manual_seed(0)
    return build_model({"kind": "aligner", "transform": "projective", "size": [64, 64], "channels": [8, 16]}).eval()


@pytest.mark.parametrize(
    "input_shape, input_dtype, support_shape",
    [((300, 200, 3), np.uint8, (90, 160)), ((57, 91), np.float32, (400, 300, 3)), ((64, 64, 1), np.uint16, (64, 64))],
)
def test_result_image_is_the_input_warped_by_the_matrix(aligner, input_shape, input_dtype, support_shape):
    rng = np.random.default_rng(0)
    scale = 1.0 if input_dtype == np.float32 else np.iinfo(input_dtype).max
    image = (rng.random(input_shape) * scale).astype(input_dtype)
    support = rng.integers(0, 256, support_shape, dtype=np.uint8)
    result = aligner.align(image, support)
    assert isinstance(result, AlignmentResult)
    assert result.matrix.shape == (3, 3) and result.matrix.dtype == np.float64
    height, width = support_shape[:2]
    assert result.image.shape == (height, width) + input_shape[2:] and result.image.dtype == image.dtype
    expected = cv2.warpPerspective(image, result.matrix, (width, height))
    np.testing.assert_allclose(result.image.astype(np.float64), expected.reshape(result.image.shape), atol=1.0 * (scale > 1) + 1e-5)


def test_matrix_maps_input_pixels_to_support_pixels_for_an_identity_theta():
    model = Aligner("affine", size=(32, 32), channels=(8,), iterations=1).eval()  # untrained head: identity
    result = model.align(np.zeros((50, 100), np.uint8), np.zeros((100, 50), np.uint8))
    # Identity in normalised coordinates: the image edges map onto each other.
    corners = np.array([[-0.5, -0.5, 1.0], [99.5, 49.5, 1.0]]) @ result.matrix.T
    np.testing.assert_allclose(corners[:, :2] / corners[:, 2:], [[-0.5, -0.5], [49.5, 99.5]], atol=1e-6)


def test_align_accepts_tensors_and_keeps_their_layout(aligner):
    image = torch.rand(1, 3, 40, 60)
    result = aligner.align(image, torch.rand(50, 30))
    assert isinstance(result.image, torch.Tensor) and result.image.shape == (1, 3, 50, 30)
    expected = cv2.warpPerspective(image[0].permute(1, 2, 0).numpy(), result.matrix, (30, 50))
    np.testing.assert_allclose(result.image[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(
    "image, error, message",
    [
        (np.zeros((0, 10), np.uint8), ValueError, "zero-size"),
        (np.zeros((4, 4, 7), np.uint8), ValueError, "shape"),
        (np.zeros((4, 4), bool), TypeError, "numeric"),
    ],
)
def test_align_rejects_bad_images(aligner, image, error, message):
    with pytest.raises(error, match=message):
        aligner.align(image, np.zeros((8, 8), np.uint8))


@register_model("test-not-an-aligner")
def _not_an_aligner() -> torch.nn.Module:
    return torch.nn.Linear(2, 2)


def test_pretrained_rejects_other_model_kinds(tmp_path):
    path = save_checkpoint(tmp_path / "linear.safetensors", build_model({"kind": "test-not-an-aligner"}))
    with pytest.raises(ValueError, match="not an aligner"):
        Aligner.pretrained(str(path))


def test_builder_validates_its_config():
    with pytest.raises(ValueError, match="transform family"):
        build_model({"kind": "aligner", "transform": "similarity"})
    with pytest.raises(ValueError, match="fusion"):
        build_model({"kind": "aligner", "fusion": "sum"})


def test_correlation_fusion_trains_and_round_trips(camera, tmp_path):
    torch.manual_seed(0)
    model = build_model({"kind": "aligner", "transform": "projective", "size": [64, 64], "channels": [8, 16, 16],
                         "iterations": 1, "fusion": "correlation"})
    x, s = torch.rand(3, 1, 64, 64), torch.rand(3, 1, 64, 64)
    assert model(x, s).shape == (3, 8)
    path = save_checkpoint(tmp_path / "corr.safetensors", model)
    loaded = load_model(path)
    assert loaded.fusion == "correlation"
    torch.testing.assert_close(loaded.eval()(x, s), model.eval()(x, s))
    # A short training on translations brings the validation error well below the identity's.
    run = train_aligner(camera, "projective", tmp_path / "run", steps=80, batch_size=16, lr=5e-3, size=(64, 64),
                        channels=(8, 16, 16), iterations=1, fusion="correlation", ranges=TRANSLATION, photometric=False,
                        eval_every=40, checkpoint_every=80, val_pairs=32, progress=False)
    import csv

    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        errors = [float(r["test_error"]) for r in csv.DictReader(handle) if r["test_error"]]
    assert errors[-1] < 0.7 * errors[0] and run.fusion == "correlation"


def test_correlation_fusion_needs_two_stages():
    with pytest.raises(ValueError, match="at least 2 stages"):
        Aligner("projective", size=(32, 32), channels=(8,), fusion="correlation")
