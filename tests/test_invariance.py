"""Invariance (Finnveden, Jansson & Lindeberg, ICPR 2020): measures, the feature-map argument, the variants, the CLI."""

from __future__ import annotations

import json

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stnkit.cli.main import main
from stnkit.data.digits import load_digit_sample
from stnkit.data.distortions import DistortedMNIST
from stnkit.evaluation.invariance import (
    canonical_spread,
    canvas_digits,
    feature_transform_gap,
    measure_invariance,
    normalised_distance,
    transform_images,
    transformation_matrix,
)
from stnkit.models import classifier, load_model, save_checkpoint
from stnkit.models.invariance_models import INVARIANCE_VARIANTS, build_invariance_model, invariance_model
from stnkit.sampling import warp
from stnkit.transforms import Translation

SMALL = [8, 8, 16, 16]


# ----------------------------------------------------------------- measures
def test_identity_transformer_gives_the_distance_of_the_raw_inputs():
    x = canvas_digits(load_digit_sample("test")[0][:20], 28)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))  # no transformer: its "output" is the input
    report = measure_invariance(model, x, None, "rotation", [0.0, 30.0, 90.0])
    assert report.rows[0].transformer_distance < 1e-10
    for row in report.rows[1:]:
        expected = normalised_distance(transform_images(x, "rotation", row.value), x)
        assert row.transformer_distance == pytest.approx(expected, rel=1e-9)
        assert row.transformer_distance > 0.1
        assert row.feature_distance is None and row.corner_error_px is None and row.error is None


def _blob_images() -> torch.Tensor:
    """Asymmetric 4x4 patterns inside a 16x16 zero frame: shifts of up to 3 px keep them inside."""
    generator = torch.Generator().manual_seed(1)
    x = torch.zeros(6, 1, 16, 16)
    x[:, :, 6:10, 5:9] = torch.rand(6, 1, 4, 4, generator=generator) + 0.1
    return x


def _centroid_canonicaliser(x: torch.Tensor) -> dict:
    """A perfect canonicaliser for translations: move the centre of mass to the image centre."""
    n, _, height, width = x.shape
    mass = x.sum(dim=(1, 2, 3))
    ys, xs = (torch.arange(height) * 2 + 1) / height - 1, (torch.arange(width) * 2 + 1) / width - 1
    cx = (x.sum(dim=(1, 2)) * xs).sum(1) / mass
    cy = (x.sum(dim=(1, 3)) * ys).sum(1) / mass
    theta = torch.stack((cx, cy), dim=1)  # backward: output p reads input p + centroid
    out = warp(x, theta, Translation())
    return {"transformer_output": out, "features": out * 2, "logits": out.flatten(1)[:, :10], "matrix": Translation().matrix(theta)}


def test_a_perfect_canonicaliser_gives_zero_distance_and_zero_corner_error():
    x = _blob_images()
    labels = _centroid_canonicaliser(x)["logits"].argmax(1)
    report = measure_invariance(None, x, labels, "translation", [-3.0, -1.0, 0.0, 2.0, 3.0], views=_centroid_canonicaliser)
    for row in report.rows:
        assert row.transformer_distance < 1e-10 and row.feature_distance < 1e-10
        assert row.corner_error_px < 1e-5
        assert row.error == 0.0
    # Without canonicalisation the shifted images are far from the originals.
    assert normalised_distance(transform_images(x, "translation", 3.0), x) > 0.5
    # ... and the canonical frame does not move (Finnveden et al.'s consistency measure).
    assert report.canonical_spread == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("kind,values,expected", [
    ("rotation", [-30.0, 0.0, 30.0], None),  # circular std of the angles
    ("translation", [-3.0, -1.0, 0.0, 2.0, 3.0], float(np.std([-3.0, -1.0, 0.0, 2.0, 3.0]))),
    ("scale", [0.8, 1.0, 1.25], float(np.std(np.log([0.8, 1.0, 1.25])))),
])
def test_canonical_spread_of_an_identity_transformer_is_the_spread_of_the_sweep(kind, values, expected):
    model = classifier("st-cnn", "affine", (28, 28))  # starts at the identity transform
    x = torch.rand(3, 1, 28, 28)
    report = measure_invariance(model, x, None, kind, values)
    if kind == "rotation":
        angles = np.deg2rad(values)
        expected = float(np.rad2deg(np.sqrt(-2 * np.log(np.hypot(np.cos(angles).mean(), np.sin(angles).mean())))))
    assert report.canonical_spread == pytest.approx(expected, rel=1e-4)
    assert "canonical spread" in report.table()


def test_canonical_spread_rejects_bad_shapes():
    with pytest.raises(ValueError, match="composed must be"):
        canonical_spread("rotation", torch.eye(3).expand(2, 3, 3), (28, 28))
    with pytest.raises(ValueError, match="unknown transformation"):
        canonical_spread("shear", torch.eye(3).expand(2, 2, 3, 3), (28, 28))


def test_corner_error_of_an_identity_transformer_is_how_far_t_moves_the_corners():
    model = classifier("st-cnn", "affine", (28, 28))  # starts at the identity transform
    x = torch.rand(4, 1, 28, 28)
    report = measure_invariance(model, x, torch.zeros(4, dtype=torch.long), "rotation", [0.0, 90.0])
    assert report.rows[0].corner_error_px == pytest.approx(0.0, abs=1e-4)
    # Rotating by 90 degrees moves each corner of a 28x28 image to the next one: 28 px.
    assert report.rows[1].corner_error_px == pytest.approx(28.0, abs=1e-3)
    assert report.rows[1].feature_distance is not None


def test_transformations_follow_the_library_convention():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 3] = 1.0
    assert transform_images(x, "translation", 2.0)[0, 0, 2, 5] == pytest.approx(1.0)  # moves right
    torch.testing.assert_close(transform_images(x, "rotation", 90.0), torch.rot90(x, 1, dims=(2, 3)), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="scale factor must be positive"):
        transformation_matrix("scale", 0.0, (8, 8))
    with pytest.raises(ValueError, match="unknown transformation 'shear'"):
        transform_images(x, "shear", 1.0)
    with pytest.raises(ValueError, match="cannot compare"):
        normalised_distance(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="images must be"):
        measure_invariance(nn.Identity(), torch.zeros(3, 8, 8))


# -------------------------------------------------------- the ICPR argument
def _fixed_cnn() -> nn.Sequential:
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.ReLU(),
    )
    for conv in (net[0], net[3]):  # the filters are not rotation-symmetric
        assert (torch.rot90(conv.weight, 1, dims=(2, 3)) - conv.weight).abs().max() > 0.1
    return net


def test_rotating_feature_maps_does_not_give_the_features_of_the_rotated_image():
    net = _fixed_cnn()
    x = canvas_digits(load_digit_sample("test")[0][:8], 28)
    with torch.no_grad():
        # Exact 90-degree turns on the pixel grid, no interpolation at all.
        # An ST on the feature maps, with the true angle: turn the maps of the rotated image back.
        maps_of_rotated = net(torch.rot90(x, 1, dims=(2, 3)))
        feature_gap = normalised_distance(torch.rot90(maps_of_rotated, -1, dims=(2, 3)), net(x))
        # Rotating the input back before computing features (an ST on the input) is exact.
        input_gap = normalised_distance(net(torch.rot90(torch.rot90(x, 1, dims=(2, 3)), -1, dims=(2, 3))), net(x))
        # Why: the features of the rotated image are those of the image under *rotated filters*.
        turned = nn.Sequential(*[nn.Conv2d(6 if i else 1, 6, 3, padding=1, bias=False) if isinstance(m, nn.Conv2d) else m
                                 for i, m in enumerate(net)])
        for mine, theirs in zip(turned, net):
            if isinstance(mine, nn.Conv2d):
                mine.weight.copy_(torch.rot90(theirs.weight, -1, dims=(2, 3)))
        torch.testing.assert_close(torch.rot90(turned(x), 1, dims=(2, 3)), maps_of_rotated, atol=1e-5, rtol=1e-5)
    assert feature_gap > 0.2, feature_gap
    assert input_gap == 0.0
    # The same numbers through the library's bilinear warp, with the exact inverse transform.
    gap = feature_transform_gap(net, x, "rotation", 90.0)
    assert gap["feature_maps"] == pytest.approx(feature_gap, rel=1e-3)
    assert gap["input"] < 1e-10
    # Translations by whole pooling cells are different: convolutions commute with them.
    shift = feature_transform_gap(net, x, "translation", 2.0)
    assert shift["feature_maps"] < 1e-2 and shift["input"] < 1e-2  # (digits touching the border lose a little)


# ------------------------------------------------------------ architectures
@pytest.fixture(scope="module")
def rotated_batch() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_digit_sample("train")
    x, y = DistortedMNIST("rotated", "train", images=images[:32], labels=labels[:32]).epoch(0)
    return x, y


@pytest.mark.parametrize("variant", INVARIANCE_VARIANTS)
def test_each_variant_trains_and_round_trips(variant, rotated_batch, tmp_path):
    x, y = rotated_batch
    torch.manual_seed(0)
    model = invariance_model(variant, "affine", (28, 28), channels=SMALL, layer=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], losses
    model.eval()
    again = load_model(save_checkpoint(tmp_path / "m.safetensors", model))
    torch.testing.assert_close(again(x[:4]), model(x[:4]))
    views = model.invariance_views(x[:4])
    assert views["logits"].shape == (4, 10)
    assert (views["matrix"] is not None) == (variant in ("stn-input", "stn-deep-loc", "stn-shared", "stn-iterative"))


def test_shared_localisation_uses_the_classifiers_own_layers():
    shared = build_invariance_model("stn-shared", layer=2, channels=SMALL)
    deep = build_invariance_model("stn-deep-loc", layer=2, channels=SMALL)
    backbone = shared.transformer.localisation.backbone
    assert backbone[0] is shared.blocks[0] and backbone[1] is shared.blocks[1]
    assert deep.transformer.localisation.backbone[0] is not deep.blocks[0]
    # Sharing saves the copied blocks' parameters.
    copied = sum(p.numel() for p in deep.blocks[:2].parameters())
    assert sum(p.numel() for p in deep.parameters()) - sum(p.numel() for p in shared.parameters()) == copied
    features = build_invariance_model("stn-features", layer=1, channels=SMALL)
    assert features.transformer.localisation.backbone[1].in_channels == SMALL[0]
    assert build_invariance_model("stn-iterative", channels=SMALL).transformer.iterations == 2


def test_bad_architecture_arguments_are_named():
    with pytest.raises(ValueError, match="unknown variant 'stn-c9'"):
        build_invariance_model("stn-c9")
    with pytest.raises(ValueError, match="layer must be between 1 and 4"):
        build_invariance_model("stn-features", layer=5)
    with pytest.raises(ValueError, match="iterations must be a positive integer"):
        build_invariance_model("stn-shared", iterations=0)
    with pytest.raises(ValueError, match="channels must be"):
        build_invariance_model("cnn", channels=[])


# ---------------------------------------------------------------------- CLI
def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> str:
    model = invariance_model("stn-input", "affine", (28, 28), channels=SMALL)
    return str(save_checkpoint(tmp_path_factory.mktemp("inv") / "m.safetensors", model))


def test_cli_measures_a_checkpoint(tiny_checkpoint, tmp_path, capsys):
    plot = tmp_path / "inv.png"
    code, out, err = run_cli(["invariance", tiny_checkpoint, "--task", "rotated", "--digit-sample", "--count", "20",
                              "--steps", "3", "--json", "--plot", str(plot)], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert [row["value"] for row in result["rows"]] == [-90.0, 0.0, 90.0]
    assert result["rows"][1]["transformer_distance"] < 1e-10
    assert plot.stat().st_size > 1000
    code, out, err = run_cli(["invariance", tiny_checkpoint, "--task", "rotated", "--digit-sample", "--count", "10",
                              "--transform", "scale", "--range", "0.8", "1.2", "--steps", "2"], capsys)
    assert code == 0, err
    assert "scale (factor)" in out and "mean" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.safetensors", "--task", "rotated", "--digit-sample"], "no such checkpoint file"),
        (["{ckpt}", "--task", "rotated", "--digit-sample", "--range", "90", "-90"], "--range must go from low to high"),
        (["{ckpt}", "--task", "rotated", "--digit-sample", "--transform", "scale", "--range", "0", "2"], "must be positive"),
        (["{ckpt}", "--task", "rotated", "--digit-sample", "--steps", "0"], "--steps must be at least 1"),
        (["{ckpt}", "--task", "rts", "--digit-sample"], "takes 28x28 inputs but task rts has 42x42"),
        (["{ckpt}", "--transform", "shear"], "'shear' is not one of"),
    ],
)
def test_cli_bad_input_is_one_line(args, message, tiny_checkpoint, capsys):
    code, out, err = run_cli(["invariance", *(a.format(ckpt=tiny_checkpoint) for a in args)], capsys)
    assert code != 0
    assert message in err and len(err.strip().splitlines()) == 1, err
