"""Distorted-MNIST generators (Jaderberg et al. 2015, Appendix A.1) and the epoch-wise dataset."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch

from stnkit.data.digits import load_digit_sample
from stnkit.data.distortions import TASKS, DistortedMNIST, distort, get_task

C = 13.5  # centre of a 28x28 image in pixel-centre coordinates


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_digit_sample("test")
    return images[:500], labels[:500]


def centroids(x: torch.Tensor) -> np.ndarray:
    """``(N, 2)`` intensity centroids ``(x, y)`` of ``(N, 1, S, S)`` images, pixel-centre coordinates."""
    img = x[:, 0].double().numpy()
    ys, xs = np.mgrid[0 : img.shape[1], 0 : img.shape[2]]
    mass = img.sum((1, 2))
    return np.stack(((img * xs).sum((1, 2)) / mass, (img * ys).sum((1, 2)) / mass), 1)


def cv2_forward(images: np.ndarray, matrices: np.ndarray, size: int) -> np.ndarray:
    """OpenCV's rendering of forward affine maps (source pixel -> canvas pixel), as an independent reference."""
    return np.stack(
        [cv2.warpAffine(img.astype(np.float32) / 255, m, (size, size), flags=cv2.INTER_LINEAR) for img, m in zip(images, matrices)]
    )


# ------------------------------------------------------------- registry
def test_task_registry():
    assert {name: (spec.code, spec.size) for name, spec in TASKS.items()} == {
        "rotated": ("R", 28),
        "rts": ("RTS", 42),
        "projective": ("P", 28),
        "elastic": ("E", 28),
        "cluttered": ("TC", 60),
        "plain": ("U", 28),
    }
    assert all(spec.description for spec in TASKS.values())
    assert get_task(TASKS["rts"]) is TASKS["rts"]


def test_unknown_task_lists_the_valid_names(digits):
    with pytest.raises(ValueError, match="unknown distorted-MNIST task 'translated'.*rotated, rts, projective, elastic, cluttered"):
        distort(digits[0], "translated", 0)
    with pytest.raises(ValueError, match="rotated, rts"):
        DistortedMNIST("RTS ", "test", images=digits[0], labels=digits[1])


def test_bad_inputs(digits):
    images, labels = digits
    with pytest.raises(TypeError, match="uint8"):
        distort(images.astype(np.float32), "rts", 0)
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        distort(images[:, None], "rts", 0)
    with pytest.raises(ValueError, match=">= 0"):
        distort(images, "rts", -1)
    with pytest.raises(TypeError, match="rng_seed"):
        distort(images, "rts", 1.5)
    with pytest.raises(ValueError, match="both images and labels"):
        DistortedMNIST("rts", "test", images=images)
    with pytest.raises(ValueError, match="500 integers"):
        DistortedMNIST("rts", "test", images=images, labels=labels[:10])
    with pytest.raises(ValueError, match="unknown split 'val'"):
        DistortedMNIST("rts", "val", images=images, labels=labels)
    with pytest.raises(ValueError, match="epoch_index"):
        DistortedMNIST("rts", "train", images=images, labels=labels).epoch(-1)


# ----------------------------------------------------------- every task
@pytest.mark.parametrize("task", list(TASKS))
def test_shape_dtype_range_and_determinism(task, digits):
    images = digits[0][:200]
    x = distort(images, task, 7)
    size = TASKS[task].size
    assert x.shape == (200, 1, size, size) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1 and x.amax((1, 2, 3)).min() > 0.3  # every digit still visible
    assert torch.equal(x, distort(images, task, 7))
    assert torch.equal(x, distort(torch.from_numpy(images), task, np.random.SeedSequence(7)))
    assert torch.equal(x, distort(images, task, 8)) == (task == "plain")  # plain draws nothing
    assert distort(images[:0], task, 0).shape == (0, 1, size, size)


# -------------------------------------------------------------------- R
def test_rotation_matches_opencv(digits):
    images = digits[0]
    x, params = distort(images, "rotated", 1, return_params=True)
    angles = params["angle_deg"]
    assert angles.min() >= -90 and angles.max() <= 90 and angles.min() < -85 and angles.max() > 85
    # getRotationMatrix2D turns counter-clockwise on screen for positive angles, as documented here.
    matrices = np.stack([cv2.getRotationMatrix2D((C, C), a, 1.0) for a in angles])
    np.testing.assert_allclose(x[:, 0].numpy(), cv2_forward(images, matrices, 28), atol=1e-3)


def test_rotation_of_a_known_image_honours_the_range():
    # A clock hand pointing right (3 o'clock): its direction after rotation is the rotation angle.
    n = 400
    hand = np.zeros((n, 28, 28), dtype=np.uint8)
    hand[:, 12:16, 16:24] = 255
    x, params = distort(hand, "rotated", 3, return_params=True)
    tip = centroids(x) - C
    measured = np.degrees(np.arctan2(-tip[:, 1], tip[:, 0]))  # screen y points down
    np.testing.assert_allclose(measured, params["angle_deg"], atol=1.0)
    assert np.abs(measured).max() <= 91 and measured.min() < -80 and measured.max() > 80


# ------------------------------------------------------------------ RTS
def test_rts_matches_opencv_and_keeps_the_digit_on_the_canvas(digits):
    images = digits[0]
    x, params = distort(images, "rts", 2, return_params=True)
    angle, scale, centre = params["angle_deg"], params["scale"], params["centre"]
    assert np.abs(angle).max() <= 45 and angle.min() < -40 and angle.max() > 40
    assert scale.min() >= 0.7 and scale.max() <= 1.2 and scale.min() < 0.75 and scale.max() > 1.15
    # Render the same similarity transforms with OpenCV on an 84x84 canvas, the 42x42 one in its middle.
    matrices = np.stack([cv2.getRotationMatrix2D((C, C), a, s) for a, s in zip(angle, scale)])
    matrices[:, :, 2] += centre - C + 21
    big = cv2_forward(images, matrices, 84)
    np.testing.assert_allclose(x[:, 0].numpy(), big[:, 21:63, 21:63], atol=1e-3)
    # Wholly inside: nothing of the digit falls outside the 42x42 window ...
    outside = big.sum((1, 2)) - big[:, 21:63, 21:63].sum((1, 2))
    assert outside.max() < 1e-3
    # ... and its ink is the original's, scaled by the area factor.
    ratio = x.sum((1, 2, 3)).numpy() / (images.reshape(len(images), -1).sum(1) / 255 * scale**2)
    assert 0.9 < ratio.min() and ratio.max() < 1.1
    # Positions spread over the canvas.
    assert np.ptp(centre, axis=0).min() > 12


# -------------------------------------------------------------------- P
def test_projective_matches_opencv(digits):
    images = digits[0]
    x, params = distort(images, "projective", 4, return_params=True)
    scale, offsets = params["scale"], params["corner_offsets_px"]
    assert scale.min() >= 0.75 and scale.max() <= 1.0 and scale.min() < 0.76 and scale.max() > 0.99
    assert abs(offsets.std() - 5.0) < 0.3 and abs(offsets.mean()) < 0.3
    # Backward map: output corner c (pixel edges -0.5 and 27.5) samples the input at c + offset,
    # divided by the scale about the centre.
    square = np.array([[-0.5, -0.5], [27.5, -0.5], [27.5, 27.5], [-0.5, 27.5]], dtype=np.float32)
    quads = C + (square - C + offsets) / scale[:, None, None]
    reference = np.stack(
        [
            cv2.warpPerspective(
                img.astype(np.float32) / 255,
                cv2.getPerspectiveTransform(square, quad.astype(np.float32)),
                (28, 28),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            )
            for img, quad in zip(images, quads)
        ]
    )
    difference = np.abs(x[:, 0].numpy() - reference)
    assert difference.mean() < 2e-3 and difference.max() < 0.1  # OpenCV rounds coordinates to 1/32 px


def test_projective_digits_stay_recognisable_in_size():
    images = load_digit_sample("train")[0][:2000]
    x, params = distort(images, "projective", 0, return_params=True)
    # Ink relative to what the scaling alone leaves: about 1 typically; the well-shaped-quad
    # rule keeps degenerate warps (digit squeezed to a speck) out.
    ink = x.sum((1, 2, 3)).numpy() / (images.reshape(len(images), -1).sum(1) / 255 * params["scale"] ** 2)
    assert 0.8 < np.median(ink) < 1.25 and (ink < 0.2).mean() < 0.005


# -------------------------------------------------------------------- E
def tps_reference(values: np.ndarray, points: np.ndarray, control: np.ndarray) -> np.ndarray:
    """Independent thin-plate spline through ``control -> values``, evaluated at ``points``."""

    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        r2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.where(r2 > 0, r2 * np.log(np.where(r2 > 0, r2, 1.0)), 0.0)

    k = len(control)
    affine = np.hstack([np.ones((k, 1)), control])
    system = np.block([[kernel(control, control), affine], [affine.T, np.zeros((3, 3))]])
    coefficients = np.linalg.solve(system, np.vstack([values, np.zeros((3, 2))]))
    return np.hstack([kernel(points, control), np.ones((len(points), 1)), points]) @ coefficients


def test_elastic_matches_an_independent_thin_plate_spline(digits):
    images = digits[0][:100]
    x, params = distort(images, "elastic", 5, return_params=True)
    scale, offsets = params["scale"], params["control_offsets_px"]
    assert offsets.shape == (100, 16, 2) and scale.min() >= 0.75 and scale.max() <= 1.0

    # 4x4 control points spanning the image edges, in pixel-centre coordinates; the backward
    # map sends control point p to C + (p + offset - C) / scale.
    control = np.stack(np.meshgrid(np.linspace(-0.5, 27.5, 4), np.linspace(-0.5, 27.5, 4)), -1).reshape(16, 2)
    ys, xs = np.mgrid[0:28, 0:28]
    pixels = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    for i in range(len(images)):
        values = C + (control + offsets[i] - C) / scale[i]
        mapped = tps_reference(values, pixels, control).reshape(28, 28, 2).astype(np.float32)
        reference = cv2.remap(images[i].astype(np.float32) / 255, mapped[..., 0], mapped[..., 1], cv2.INTER_LINEAR)
        difference = np.abs(x[i, 0].numpy() - reference)
        assert difference.mean() < 2e-3 and difference.max() < 0.1, i


def test_elastic_offsets_follow_the_paper_and_ignore_content():
    n = 2000
    _, params = distort(np.zeros((n, 28, 28), dtype=np.uint8), "elastic", 9, return_params=True)
    offsets = params["control_offsets_px"]
    assert abs(offsets.std() - 1.5) < 0.05 and abs(offsets.mean()) < 0.05
    _, again = distort(np.full((n, 28, 28), 255, dtype=np.uint8), "elastic", 9, return_params=True)
    np.testing.assert_array_equal(again["control_offsets_px"], offsets)


# ------------------------------------------------------------------- TC
def test_cluttered_places_the_digit_and_clutter_from_other_digits(digits):
    images = digits[0]
    x, params = distort(images, "cluttered", 6, return_params=True)
    canvas = np.round(x[:, 0].numpy() * 255).astype(np.uint8)
    assert canvas.shape == (500, 60, 60)
    offset, source = params["digit_offset"], params["fragment_source"]
    crop, paste = params["fragment_crop"], params["fragment_offset"]
    assert offset.min() >= 0 and offset.max() <= 32
    assert source.shape == (500, 6) and (source != np.arange(500)[:, None]).all()
    for i in range(0, 500, 25):
        (ox, oy) = offset[i]
        window = canvas[i, oy : oy + 28, ox : ox + 28]
        assert (window >= images[i]).all()  # clutter is added, never erases the digit
        for k in range(6):
            (cx, cy), (px, py) = crop[i, k], paste[i, k]
            piece = images[source[i, k], cy : cy + 6, cx : cx + 6]
            assert (canvas[i, py : py + 6, px : px + 6] >= piece).all()
    # Clutter shows outside the digit's frame for most images.
    outside = canvas.astype(int).sum((1, 2)) - np.array(
        [canvas[i, oy : oy + 28, ox : ox + 28].astype(int).sum() for i, (ox, oy) in enumerate(offset)]
    )
    assert (outside > 0).mean() > 0.5


# -------------------------------------------------------------- dataset
def test_plain_returns_the_digits_as_they_are(digits):
    images = digits[0][:50]
    x, params = distort(images, "plain", 3, return_params=True)
    assert params == {}
    assert torch.equal(x[:, 0], torch.from_numpy(images).float() / 255.0)
    assert not torch.equal(distort(images, "plain", 3, jitter_px=1.0), x)  # the jitter still applies


# ------------------------------------------------------- training jitter
def test_jitter_leaves_the_task_draws_alone(digits):
    images = digits[0][:200]
    plain, params = distort(images, "rts", 4, return_params=True)
    jittered, jitter_params = distort(images, "rts", 4, return_params=True, jitter_px=1.0)
    for key in params:
        np.testing.assert_array_equal(jitter_params[key], params[key])
    assert torch.equal(distort(images, "rts", 4, jitter_px=0.0), plain)
    assert torch.equal(distort(images, "rts", 4, jitter_px=1.0), jittered)  # deterministic
    # A mild bend: the digits change, their ink and position hardly.
    assert (jittered - plain).abs().mean() > 0.01
    ink_ratio = (jittered.sum((1, 2, 3)) / plain.sum((1, 2, 3))).numpy()
    assert abs(ink_ratio.mean() - 1) < 0.05 and 0.5 < ink_ratio.min() and ink_ratio.max() < 1.5
    shift = np.abs(centroids(jittered) - centroids(plain))
    assert shift.mean() < 0.6 and shift.max() < 2.5
    offsets = distort(np.zeros((3000, 28, 28), np.uint8), "rotated", 1, return_params=True, jitter_px=0.7)[1]
    assert offsets["jitter_offsets_px"].shape == (3000, 16, 2)
    assert abs(offsets["jitter_offsets_px"].std() - 0.7) < 0.02


def test_jitter_matches_an_independent_composition(digits):
    """Rotation after an exact thin-plate-spline jitter, rendered with OpenCV's remap."""
    images = digits[0][:40]
    x, params = distort(images, "rotated", 2, return_params=True, jitter_px=1.0)
    control = np.stack(np.meshgrid(np.linspace(-0.5, 27.5, 4), np.linspace(-0.5, 27.5, 4)), -1).reshape(16, 2)
    ys, xs = np.mgrid[0:28, 0:28]
    pixels = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    for i in range(len(images)):
        # Backward rotation about the centre (counter-clockwise on screen for positive angles) ...
        a = np.deg2rad(params["angle_deg"][i])
        rotation = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        rotated = (pixels - C) @ rotation.T + C
        # ... then the jitter spline, exactly, at the rotated points.
        mapped = tps_reference(control + params["jitter_offsets_px"][i], rotated, control)
        mapped = mapped.reshape(28, 28, 2).astype(np.float32)
        reference = cv2.remap(images[i].astype(np.float32) / 255, mapped[..., 0], mapped[..., 1], cv2.INTER_LINEAR)
        difference = np.abs(x[i, 0].numpy() - reference)
        assert difference.mean() < 5e-3 and difference.max() < 0.25, i


def test_jitter_bad_input(digits):
    images, labels = digits
    for bad in (-1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="jitter_px must be a finite number of pixels >= 0"):
            distort(images[:2], "rotated", 0, jitter_px=bad)
    with pytest.raises(ValueError, match="cluttered task pastes digits without resampling"):
        distort(images[:2], "cluttered", 0, jitter_px=1.0)
    with pytest.raises(ValueError, match="test sets are made as the protocol says"):
        DistortedMNIST("rotated", "test", images=images, labels=labels, jitter_px=1.0)
    train = DistortedMNIST("rotated", "train", images=images, labels=labels, jitter_px=1.0)
    assert "jitter_px=1.0" in repr(train)
    assert not torch.equal(train.epoch(0)[0], DistortedMNIST("rotated", "train", images=images, labels=labels).epoch(0)[0])


def test_train_epochs_are_redrawn_and_test_is_fixed(digits):
    images, labels = digits
    train = DistortedMNIST("rts", "train", seed=3, images=images, labels=labels)
    x0, y0 = train.epoch(0)
    x1, y1 = train.epoch(1)
    assert x0.shape == (500, 1, 42, 42) and y0.dtype == torch.int64 and len(train) == 500 and train.size == 42
    assert torch.equal(y0, torch.from_numpy(labels)) and torch.equal(y0, y1)
    assert not torch.equal(x0, x1)
    assert torch.equal(x1, DistortedMNIST("rts", "train", seed=3, images=images, labels=labels).epoch(1)[0])
    # seed + epoch: epoch 1 of seed 3 is epoch 0 of seed 4.
    assert torch.equal(x1, DistortedMNIST("rts", "train", seed=4, images=images, labels=labels).epoch(0)[0])

    test = DistortedMNIST("rts", "test", seed=3, images=images, labels=labels)
    t0, _ = test.epoch(0)
    assert torch.equal(t0, test.epoch(5)[0])
    assert torch.equal(t0, DistortedMNIST("rts", "test", seed=3, images=images, labels=labels).epoch(9)[0])
    assert not torch.equal(t0, x0)  # train and test draw from different streams
    assert not torch.equal(t0, DistortedMNIST("rts", "test", seed=4, images=images, labels=labels).epoch(0)[0])


def test_dataset_loads_real_mnist(data_root):
    data = DistortedMNIST("rotated", "test", root=data_root)
    x, y = data.epoch(0)
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert np.bincount(y.numpy()).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.slow
def test_a_full_epoch_distorts_in_seconds():
    images = np.resize(load_digit_sample("train")[0], (60000, 28, 28))
    for task in TASKS:
        start = time.perf_counter()
        distort(images, task, 0)
        assert time.perf_counter() - start < 10, task


@pytest.mark.parametrize("task", ["rotated", "rts", "projective", "elastic"])
def test_a_device_changes_where_the_warp_runs_not_what_it_draws(task, digits):
    images = digits[0][:16]
    on_host = distort(images, task, rng_seed=5)
    assert torch.equal(distort(images, task, rng_seed=5, device="cpu"), on_host)
    data = DistortedMNIST(task, "train", images=images, labels=digits[1][:16])
    x, y = data.epoch(2, device="cpu")
    assert torch.equal(x, data.epoch(2)[0]) and y.dtype == torch.int64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("task", ["rotated", "rts", "projective", "elastic"])
def test_a_cuda_epoch_matches_the_cpu_epoch(task, digits):
    data = DistortedMNIST(task, "train", images=digits[0][:256], labels=digits[1][:256])
    x, y = data.epoch(1, device="cuda")
    assert x.is_cuda and y.is_cuda
    torch.testing.assert_close(x.cpu(), data.epoch(1)[0], atol=1e-4, rtol=0)
    test = DistortedMNIST(task, "test", images=digits[0][:64], labels=digits[1][:64])
    assert torch.equal(test.epoch(0, device="cuda")[0].cpu(), test.epoch(0)[0])
