"""The Triton (CUDA) fused warp kernels against the reference path.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
in a subprocess: the variable must be set before Triton is imported), on CPU
tensors: values and gradients for every family, mode and padding. With CUDA,
the same comparison runs on the device (marked ``gpu``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

from stnkit.sampling import fused  # noqa: E402

CHECK = textwrap.dedent(
    """
    import itertools, json, os, sys
    import torch
    from stnkit import warp
    from stnkit.sampling.fused import fused_warp
    from stnkit.transforms import get_transform

    device = sys.argv[1]
    torch.manual_seed(0)
    x = torch.rand(2, 3, 11, 13, device=device)
    results = {}
    for family, mode, padding in itertools.product(
        ["affine", "projective"], ["bilinear", "nearest"], ["zeros", "border", "reflection", "fill"]
    ):
        transform = get_transform(family)
        theta = transform.identity(2) + 0.15 * torch.randn(2, transform.num_params)
        if family == "affine":
            theta[:, [0, 4]] *= 1.3  # zoom out: points fall outside, every padding mode matters
        theta = theta.to(device).requires_grad_()
        fill = [0.2, 0.5, 0.9] if padding == "fill" else 0.0
        grad_out = torch.randn(2, 3, 9, 15, device=device)
        os.environ["STNKIT_FUSED"] = "0"
        x_ref = x.clone().requires_grad_()
        reference = warp(x_ref, theta, transform, (9, 15), mode, padding, fill)
        gx_ref, gt_ref = torch.autograd.grad(reference, (x_ref, theta), grad_out)
        x_tri = x.clone().requires_grad_()
        theta_tri = theta.detach().clone().requires_grad_()
        out = fused_warp(x_tri, theta_tri, transform, (9, 15), mode, padding, fill, implementation="triton")
        gx, gt = torch.autograd.grad(out, (x_tri, theta_tri), grad_out)
        results[f"{family}/{mode}/{padding}"] = [
            float((out - reference).abs().max()),
            float((gx - gx_ref).abs().max()),
            # theta's gradient sums hundreds of terms (in another order on a GPU): relative to its size
            float((gt - gt_ref).abs().max() / gt_ref.abs().max().clamp_min(1.0)),
        ]
    print(json.dumps(results))
    """
)


def _run_check(device: str, env: dict[str, str]) -> dict[str, list[float]]:
    done = subprocess.run([sys.executable, "-c", CHECK, device], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_close(results: dict[str, list[float]]) -> None:
    assert len(results) == 16
    for case, (forward, grad_x, grad_theta) in results.items():
        assert forward < 1e-5, (case, forward)
        assert grad_x < 1e-5, (case, grad_x)
        assert grad_theta < 1e-5, (case, grad_theta)  # relative to the largest entry (~40 here)


def test_interpreted_kernels_match_the_reference_in_every_mode():
    _assert_close(_run_check("cpu", {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernels_match_the_reference_in_every_mode():
    _assert_close(_run_check("cuda", {}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_warp_uses_the_triton_kernels_on_cuda():
    x = torch.rand(2, 1, 8, 8, device="cuda")
    assert fused.fused_applicable(x, torch.zeros(2, 6, device="cuda"), "affine")
    assert not fused.fused_applicable(x.double(), torch.zeros(2, 6, device="cuda"), "affine")  # float64: reference


def test_triton_implementation_refuses_what_it_cannot_run():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton's interpreter")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        fused.fused_warp(torch.rand(1, 1, 4, 4), torch.zeros(1, 6), "affine", implementation="triton")
    with pytest.raises(ValueError, match="expected 'c', 'torch' or 'triton'"):
        fused.fused_warp(torch.rand(1, 1, 4, 4), torch.zeros(1, 6), "affine", implementation="cuda")
