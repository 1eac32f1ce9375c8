"""Numerical robustness: degenerate and extreme transforms, 16-bit precision, and the collapse guard.

Every case ends either in a finite output (a documented fallback) or in a
ValueError that names the problem: never in NaN/Inf without a word.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from stnkit.models.classifiers import classifier
from stnkit.sampling import sample, warp
from stnkit.training import TrainConfig, Trainer
from stnkit.training.guards import CollapseGuard, linear_determinant
from stnkit.transforms import (
    TRANSFORMS,
    Affine,
    Projective,
    ScaleTranslation,
    Similarity,
    ThinPlateSpline,
    get_transform,
)
from stnkit.transforms.base import GRID_LIMIT, grid_limit
from stnkit.transforms.tps import solve_tps_system

# ---------------------------------------------------------------- homographies


def horizon_theta(dtype=torch.float32) -> torch.Tensor:
    # w = 1 - 2x: the bottom row vanishes on the line x = 0.5 and is negative beyond it.
    return torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, -2.0, 0.0]], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_vanishing_bottom_row_gives_a_finite_clamped_grid(dtype):
    grid = Projective().grid(horizon_theta(dtype), (16, 16))
    assert grid.dtype == dtype
    assert torch.isfinite(grid).all()
    assert grid.abs().max() <= grid_limit(dtype)


def test_points_beyond_the_horizon_read_the_padding():
    x = torch.rand(1, 1, 16, 16)
    out = warp(x, horizon_theta(), "projective", padding_mode="zeros")
    assert torch.isfinite(out).all()
    columns = torch.arange(16)
    beyond = ((2 * columns + 1) / 16 - 1) >= 0.5  # output columns with w <= 0
    assert (out[..., beyond] == 0).all()
    assert (out[..., ~beyond].abs().sum() > 0)
    filled = warp(x, horizon_theta(), "projective", padding_mode="fill", fill_value=0.25)
    torch.testing.assert_close(filled[..., beyond], torch.full_like(filled[..., beyond], 0.25))


def test_horizon_gradients_are_finite():
    theta = horizon_theta().requires_grad_()
    warp(torch.rand(1, 1, 12, 12), theta, "projective").sum().backward()
    assert torch.isfinite(theta.grad).all()


@pytest.mark.parametrize("name", ["affine", "similarity", "scale_translation", "projective"])
def test_inverse_of_a_singular_matrix_is_a_clear_error(name):
    transform = get_transform(name)
    theta = transform.identity(3)
    theta[1] = 0  # zero linear part (scale 0 for similarity/scale-translation; h33 stays 1 for projective)
    if name == "projective":
        theta[1, 6:] = 0
    with pytest.raises(ValueError, match=r"singular matrix for batch item\(s\) \[1\]"):
        transform.inverse(theta)


def test_inverse_of_a_near_singular_matrix_is_finite_and_exact():
    theta = torch.tensor([[1e-12, 0.0, 0.3, 0.0, 1e-12, -0.2]], dtype=torch.float64)
    inverse = Affine().inverse(theta)
    assert torch.isfinite(inverse).all()
    torch.testing.assert_close(Affine().matrix(Affine().compose(theta, inverse)), torch.eye(3, dtype=torch.float64).unsqueeze(0))


def test_composing_to_a_matrix_with_zero_h33_is_a_clear_error():
    first = torch.tensor([[1.0, 0, 0, 0, 1, 0, 1.0, 0]])
    second = torch.tensor([[1.0, 0, -1.0, 0, 1, 0, 0, 0]])  # moves the output centre onto first's horizon
    with pytest.raises(ValueError, match="zero bottom-right entry"):
        Projective().compose(first, second)
    with pytest.raises(ValueError, match="zero bottom-right entry"):
        Affine().from_matrix(torch.zeros(1, 3, 3))


@pytest.mark.parametrize(
    "offsets",
    [
        [2.0, 2.0, 0, 0, 0, 0, 0, 0],  # top-left corner moved onto the bottom-right one
        [1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0],  # every corner on the centre
    ],
)
def test_degenerate_corner_homography_is_a_clear_error(offsets):
    with pytest.raises(ValueError, match="degenerate transform"):
        Projective("corners").grid(torch.tensor([offsets]), (8, 8))
    # warp() in a child process: a native fast path that crashed on the NaN matrix
    # would take the whole test session down with it.
    code = (
        "import torch\nfrom stnkit.sampling import warp\nfrom stnkit.transforms import Projective\n"
        f"warp(torch.rand(1, 1, 8, 8), torch.tensor([{offsets!r}]), Projective('corners'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, f"exit code {result.returncode} (negative: killed by a signal)\n{result.stderr[-500:]}"
    assert "ValueError" in result.stderr and "degenerate transform" in result.stderr, result.stderr[-500:]


# ---------------------------------------------------------------- extreme scales


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1e6, 1e30])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_extreme_scales_give_finite_outputs(scale, padding_mode, mode):
    x = torch.rand(2, 1, 10, 10)
    theta = torch.tensor([[scale, 0.0, 0.0, 0.0, scale, 0.0]]).expand(2, -1)
    out = warp(x, theta, "affine", padding_mode=padding_mode, mode=mode)
    assert torch.isfinite(out).all()
    if scale <= 1e-6 and mode == "bilinear":
        # Zoomed onto the centre point: every output pixel reads (nearly) the same value.
        assert (out.amax(dim=(2, 3)) - out.amin(dim=(2, 3))).max() < 1e-3
    if scale >= 1e6 and padding_mode == "zeros":
        assert out.abs().max() < 1e-3  # the image shrank to (almost) nothing


@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
def test_warp_at_an_astronomical_scale_stays_finite(padding_mode):
    # Grid points near 3e38 (inf after the multiply-adds). A child process: a native
    # path that crashed here would otherwise take the whole test session down.
    code = (
        "import torch\nfrom stnkit.sampling import warp\n"
        "out = warp(torch.rand(1, 1, 8, 8), torch.tensor([[3e38, 0, 3e38, 0, 3e38, 0.0]]), 'affine', "
        f"padding_mode={padding_mode!r})\n"
        "assert torch.isfinite(out).all(), 'non-finite output'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"exit code {result.returncode} (negative: killed by a signal)\n{result.stderr[-500:]}"


@pytest.mark.parametrize("value", [1e38, 3e38, float("inf"), float("-inf")])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection", "fill"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_sampler_clamps_huge_and_infinite_points(value, padding_mode, mode):
    # Unclamped, grid_sample returns NaN for these with zeros padding and for bicubic.
    x = torch.rand(1, 1, 6, 6)
    grid = torch.zeros(1, 3, 3, 2)
    grid[0, 0, 0, 0] = value
    out = sample(x, grid, mode=mode, padding_mode=padding_mode, fill_value=0.5)
    assert torch.isfinite(out).all()
    clamped = sample(x, grid.clamp(-GRID_LIMIT, GRID_LIMIT), mode=mode, padding_mode=padding_mode, fill_value=0.5)
    torch.testing.assert_close(out, clamped)


def test_sampler_refuses_nan_points():
    grid = torch.zeros(1, 2, 2, 2)
    grid[0, 1, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="grid contains NaN"):
        sample(torch.rand(1, 1, 4, 4), grid)


def test_nan_or_inf_theta_is_a_clear_error():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="theta contains NaN or Inf"):
            warp(torch.rand(1, 1, 4, 4), torch.tensor([[bad, 0, 0, 0, 1, 0]]), "affine")


def test_float16_grids_stay_finite_after_the_cast():
    # Computed in float32 (points up to 1e6 for a near-horizon homography), then cast:
    # without the clamp, float16 would turn them into inf.
    theta = torch.tensor([[1.0, 0, 0, 0, 1, 0, -0.999, 0]], dtype=torch.float16)
    grid = Projective().grid(theta, (64, 64))
    assert torch.isfinite(grid).all() and grid.abs().max() <= grid_limit(torch.float16)
    out = warp(torch.rand(1, 1, 64, 64, dtype=torch.float16), theta, "projective")
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- 16-bit autocast


def _member(name: str, dtype) -> torch.Tensor:
    transform = get_transform(name)
    generator = torch.Generator().manual_seed(3)
    theta = transform.identity(2) + 0.05 * torch.randn(2, transform.num_params, generator=generator)
    return theta.to(dtype)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_grids_are_float32_and_match_full_precision(name, dtype):
    transform = get_transform(name)
    theta = _member(name, dtype)  # what a localisation net returns under autocast
    reference = transform.grid(theta.float(), (20, 24))
    with torch.autocast("cpu", dtype=dtype):
        grid = transform.grid(theta, (20, 24))
        out = warp(torch.rand(2, 1, 20, 24), theta, transform)
    assert grid.dtype == torch.float32
    # Same parameters, same precision: only float32 rounding apart.
    torch.testing.assert_close(grid, reference, atol=1e-5, rtol=0)
    assert torch.isfinite(out).all()


def test_16bit_theta_outside_autocast_keeps_its_dtype():
    theta = _member("affine", torch.bfloat16)
    grid = Affine().grid(theta, (8, 8))
    assert grid.dtype == torch.bfloat16
    torch.testing.assert_close(grid.float(), Affine().grid(theta.float(), (8, 8)), atol=1e-2, rtol=0)


# ---------------------------------------------------------------- thin-plate splines


def test_coincident_control_points_are_a_clear_error():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="control points 0 and 3 coincide"):
        solve_tps_system(points)
    # With regularisation the spline smooths instead of interpolating: duplicates are fine.
    assert torch.isfinite(solve_tps_system(points, regularisation=0.1)).all()


def test_collinear_control_points_are_a_clear_error():
    with pytest.raises(ValueError, match="lie on one line"):
        solve_tps_system(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))


def test_control_points_sent_to_one_point_give_a_finite_grid():
    tps = ThinPlateSpline((3, 3))
    theta = tps.identity(1)
    theta[0, 0:2] = torch.tensor([1.0, 0.0])  # control point 0 now samples where control point 1 does
    grid = tps.grid(theta, (16, 16))
    assert torch.isfinite(grid).all()
    torch.testing.assert_close(tps.transform_points(theta, tps.control_points()[:2].unsqueeze(0))[0, 0], torch.tensor([0.0, -1.0]))


def test_tps_inverse_of_a_wild_warp_is_a_clear_error():
    tps = ThinPlateSpline((3, 3))
    theta = 5 * torch.randn(1, tps.num_params, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="diverged"):
        tps.inverse(theta)


# ---------------------------------------------------------------- collapse guard


def test_guard_measures_blank_outputs_and_bad_determinants():
    guard = CollapseGuard()
    x = torch.rand(4, 1, 8, 8)
    healthy = guard.measure(Affine(), Affine().identity(4), x, x)
    assert healthy["blank"] == 0 and healthy["bad_det"] == 0
    assert guard._judge(healthy) is None
    zoomed_out = torch.tensor([[50.0, 0, 0, 0, 50.0, 0]]).expand(4, -1)
    stats = guard.measure(Affine(), zoomed_out, x, torch.zeros_like(x))
    assert stats["blank"] == 1 and stats["bad_det"] == 1
    assert "blank" in guard._judge(stats)
    tiny = guard.measure(ScaleTranslation(), torch.tensor([[1e-3, 0.0, 0.0]]).expand(4, -1), x, x)
    assert "|det|" in guard._judge(tiny)
    assert linear_determinant(Similarity(), torch.tensor([[2.0, 0.3, 0.0, 0.0]])).item() == pytest.approx(4.0)


def test_guard_ignores_constant_inputs_and_errors_name_the_problem():
    x = torch.zeros(2, 1, 8, 8)
    stats = CollapseGuard().measure(Affine(), Affine().identity(2), x, x)
    assert stats["blank"] == 0
    with pytest.raises(ValueError, match="min_det"):
        CollapseGuard(min_det=2.0)
    with pytest.raises(TypeError, match="min_std_ratio"):
        CollapseGuard(min_std_ratio="low")
    with pytest.raises(TypeError, match="guard must be"):
        Trainer(classifier("st-fcn", "affine", (12, 12)), None, lambda e: _blob_data(8), _blob_data(8), guard="yes")


def _blob_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares on a dark 12x12 canvas, labelled by quadrant (4 classes)."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = 0.05 * torch.rand(n, 1, 12, 12, generator=generator)
    for i, label in enumerate(y.tolist()):
        top, left = 6 * (label // 2) + 1, 6 * (label % 2) + 1
        x[i, 0, top : top + 4, left : left + 4] += 0.9
    return x, y


def _collapsing_model(collapse_at_call: int):
    """ST-FCN whose transform is made to collapse (zoom out 50x) once, at one training forward pass."""
    model = classifier("st-fcn", "affine", (12, 12), bounds=False, num_classes=4)
    head = model.transformer.localisation.head.linear
    calls = {"n": 0}

    def sabotage(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] == collapse_at_call:
                with torch.no_grad():  # what one bad localisation update does
                    head.weight.zero_()
                    head.bias.copy_(torch.tensor([50.0, 0, 0, 0, 50.0, 0]))

    model.transformer.register_forward_pre_hook(sabotage)
    return model


def test_trainer_skips_collapsed_steps_rolls_back_and_slows_the_localisation_net(caplog):
    torch.manual_seed(0)
    model = _collapsing_model(collapse_at_call=6)
    config = TrainConfig(epochs=1, batch_size=8, lr=0.01, checkpoint_every=2, max_nonfinite=3, progress=False)
    trainer = Trainer(model, None, lambda epoch: _blob_data(96), _blob_data(32, seed=1), config)
    with caplog.at_level(logging.WARNING):
        result = trainer.fit()
    assert len(trainer.guard.events) == 3
    assert all("blank" in event.reason for event in trainer.guard.events)
    assert result.skipped_steps == 3
    assert result.localisation_lr_factor == 0.5
    assert any("restored the last good checkpoint" in message for message in caplog.messages)
    assert any("transform collapse" in message for message in caplog.messages)
    # Back on the good state: the transform is healthy again and training went on.
    det = linear_determinant(Affine(), model.transformer.localisation(_blob_data(8)[0])).abs()
    assert ((det > 0.01) & (det < 100)).all()
    assert result.steps == 12


def test_without_the_guard_the_collapse_goes_unnoticed():
    torch.manual_seed(0)
    model = _collapsing_model(collapse_at_call=6)
    config = TrainConfig(epochs=1, batch_size=8, lr=0.01, checkpoint_every=2, max_nonfinite=3, progress=False)
    result = Trainer(model, None, lambda epoch: _blob_data(96), _blob_data(32, seed=1), config, guard=False).fit()
    assert result.skipped_steps == 0
    det = linear_determinant(Affine(), model.transformer.localisation(_blob_data(8)[0])).abs()
    assert (det > 100).all()  # still zoomed out 50x: blank outputs for the rest of the run


def test_guard_leaves_a_healthy_run_bit_identical():
    weights = []
    for guard in (True, False):
        torch.manual_seed(0)
        model = classifier("st-fcn", "affine", (12, 12), num_classes=4)
        config = TrainConfig(epochs=2, batch_size=16, lr=0.05, progress=False)
        trainer = Trainer(model, None, lambda epoch: _blob_data(64, seed=epoch), _blob_data(32, seed=9), config, guard=guard)
        result = trainer.fit()
        assert result.skipped_steps == 0
        if guard:
            assert trainer.guard.events == []
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def _diverging_model(at_call: int):
    """ST-FCN whose localisation weights turn NaN once (what an inf gradient step does), at one training pass."""
    model = classifier("st-fcn", "affine", (12, 12), num_classes=4)
    head = model.transformer.localisation.head.linear
    calls = {"n": 0}

    def sabotage(module, args):
        if module.training:
            calls["n"] += 1
            if calls["n"] == at_call:
                with torch.no_grad():
                    head.weight.fill_(float("nan"))

    model.transformer.register_forward_pre_hook(sabotage)
    return model


def test_nan_localisation_weights_are_rolled_back_instead_of_stopping_the_run():
    torch.manual_seed(0)
    model = _diverging_model(at_call=6)
    config = TrainConfig(epochs=1, batch_size=8, lr=0.01, checkpoint_every=2, max_nonfinite=3, progress=False)
    trainer = Trainer(model, None, lambda epoch: _blob_data(96), _blob_data(32, seed=1), config)
    result = trainer.fit()
    assert result.skipped_steps == 3 and result.localisation_lr_factor == 0.5
    assert all("NaN/Inf" in event.reason for event in trainer.guard.events)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.steps == 12


def test_without_the_guard_nan_localisation_weights_stop_the_run():
    torch.manual_seed(0)
    config = TrainConfig(epochs=1, batch_size=8, lr=0.01, progress=False)
    trainer = Trainer(_diverging_model(at_call=3), None, lambda epoch: _blob_data(32), _blob_data(8), config, guard=False)
    with pytest.raises(ValueError, match="theta contains NaN or Inf"):
        trainer.fit()


def test_the_guard_never_touches_theta_in_eval_mode():
    model = _diverging_model(at_call=1)
    guard = CollapseGuard().attach(model)
    model.train()(torch.rand(2, 1, 12, 12))  # the sabotage fires: weights are NaN now
    guard.check(step=1)
    with pytest.raises(ValueError, match="theta contains NaN or Inf"):
        model.eval()(torch.rand(2, 1, 12, 12))


def test_the_guard_judges_a_localisation_pass_without_a_transformer_forward_at_this_step():
    # The consistency loss reads theta with predict_theta alone; a NaN there must skip this step.
    model = classifier("st-fcn", "affine", (12, 12), num_classes=4).train()
    guard = CollapseGuard().attach(model)
    with torch.no_grad():
        model.transformer.localisation.head.linear.weight.fill_(float("nan"))
    theta = model.transformer.predict_theta(torch.rand(3, 1, 12, 12))
    assert torch.isfinite(theta).all()  # replaced by the identity
    assert "NaN/Inf" in guard.check(step=1)
    assert guard.check(step=2) is None  # counted once, at the step it happened
