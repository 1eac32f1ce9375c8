"""Localisation nets and the SpatialTransformer module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stnkit
from stnkit import SpatialTransformer, Warp
from stnkit.localisation import (
    ParameterBounds,
    RegressionHead,
    conv_localisation,
    default_bounds,
    fc_localisation,
    localisation_from_layers,
)
from stnkit.transforms import TRANSFORMS, get_transform

FAMILIES = sorted(TRANSFORMS)


@pytest.mark.parametrize("name", FAMILIES)
def test_heads_start_at_identity(name):
    transform = get_transform(name)
    for bounds in (None, True):
        head = RegressionHead(12, transform, bounds=bounds)
        torch.testing.assert_close(head(torch.randn(4, 12)), transform.identity(4))


@pytest.mark.parametrize("builder", ["fc", "conv"])
def test_builders_predict_identity_for_every_input(builder):
    if builder == "fc":
        loc = fc_localisation(1, (28, 28), "affine")
    else:
        loc = conv_localisation(1, (42, 42), "affine")
    x = torch.rand(3, 1, 28, 28) if builder == "fc" else torch.rand(3, 1, 42, 42)
    torch.testing.assert_close(loc(x), stnkit.Affine().identity(3))


def test_bounds_keep_theta_inside_the_box():
    bounds = default_bounds("affine", max_translation=0.5, max_linear=0.3)
    theta = bounds(torch.randn(100, 6) * 100)
    assert (theta - stnkit.Affine().identity(1)).abs().le(torch.tensor([0.3, 0.3, 0.5, 0.3, 0.3, 0.5]) + 1e-6).all()
    # Near the centre the bounds are the identity map to first order.
    small = torch.full((1, 6), 1e-4)
    torch.testing.assert_close(bounds(small) - bounds.centre, small, atol=2e-7, rtol=1e-3)
    with pytest.raises(ValueError, match="positive"):
        ParameterBounds(torch.zeros(2), torch.tensor([1.0, 0.0]))


def test_localisation_from_layers_infers_features():
    backbone = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
    loc = localisation_from_layers(backbone, "projective", example_input=torch.zeros(1, 2, 16, 16))
    assert loc(torch.rand(5, 2, 30, 30)).shape == (5, 8)
    with pytest.raises(ValueError, match="feature_dim"):
        localisation_from_layers(backbone, "affine")
    with pytest.raises(ValueError, match="too small"):
        conv_localisation(1, (6, 6), "affine")


def test_spatial_transformer_shapes_and_identity():
    st = SpatialTransformer(conv_localisation(3, (32, 32), "affine"), out_size=(20, 24), loc_size=(32, 32))
    x = torch.rand(2, 3, 64, 80)  # any input size: the localisation reads a resized copy
    y = st(x)
    assert y.shape == (2, 3, 20, 24)
    torch.testing.assert_close(st.last_theta, stnkit.Affine().identity(2))
    # Identity theta and same-size output reproduce the input.
    st_same = SpatialTransformer(conv_localisation(3, (32, 32), "affine"))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(st_same(x), x, atol=2e-6, rtol=0)


def test_separate_localisation_input_and_support():
    loc = conv_localisation(2, (28, 28), "similarity")
    st = SpatialTransformer(loc, out_size=(28, 28))
    x, support = torch.rand(2, 1, 96, 96), torch.rand(2, 1, 48, 48)
    small = torch.nn.functional.interpolate(x, size=(28, 28))
    y = st(x, support=support, loc_input=small)
    assert y.shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="batch mismatch"):
        st(x, support=support[:1], loc_input=small)


class FixedStep(nn.Module):
    """A 'localisation net' that always predicts the same small translation."""

    transform = stnkit.Translation()

    def forward(self, x):
        return torch.tensor([[0.1, -0.05]]).expand(x.shape[0], 2)


def test_iterations_compose_and_sample_once():
    st = SpatialTransformer(FixedStep(), iterations=3)
    x = torch.rand(2, 1, 16, 16)
    st(x)
    torch.testing.assert_close(st.last_theta, torch.tensor([[0.3, -0.15]]).expand(2, 2))
    # Sampled once: equals one warp by the composed parameters.
    torch.testing.assert_close(st(x), stnkit.warp(x, st.last_theta, "translation"))


def test_module_gradients_reach_localisation_and_input():
    st = SpatialTransformer(fc_localisation(1, (12, 12), "projective"))
    x = torch.rand(3, 1, 12, 12, requires_grad=True)
    st(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert st.localisation.head.linear.weight.grad.abs().sum() > 0


def test_warp_module_and_bad_arguments():
    w = Warp("affine", out_size=(5, 5), padding_mode="fill", fill_value=0.5)
    assert w(torch.rand(1, 1, 8, 8), stnkit.Affine().identity(1)).shape == (1, 1, 5, 5)
    with pytest.raises(ValueError, match="unknown mode"):
        Warp("affine", mode="lanczos")
    with pytest.raises(ValueError, match="iterations"):
        SpatialTransformer(FixedStep(), iterations=0)
    st = SpatialTransformer(FixedStep(), iterations=2)
    for bad in (0, 1.5, True):  # assigned later, as the CLIs do on loaded models
        with pytest.raises(ValueError, match="iterations must be a positive integer"):
            st.iterations = bad
    assert st.iterations == 2
    with pytest.raises(ValueError, match="transform="):
        SpatialTransformer(nn.Identity())


def test_compile_spatial_transformer():
    st = SpatialTransformer(conv_localisation(1, (28, 28), "affine"), iterations=2)
    x = torch.rand(2, 1, 28, 28)
    compiled = torch.compile(st, backend="eager")
    torch.testing.assert_close(compiled(x), st(x))
