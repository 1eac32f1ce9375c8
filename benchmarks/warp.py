"""Benchmark warping: stnkit.warp against PyTorch, kornia and OpenCV, forward and forward+backward.

For the affine, projective and thin-plate-spline families and the batch shapes
(256,1,28,28), (256,1,60,60), (64,3,224,224) and (1,3,2048,2048) (output size =
input size), every method warps the same float32 images by equivalent maps:

=====================  ==================================================================
``stnkit.warp``        the default path (the fused C kernel for matrix families, see
                       :mod:`stnkit.sampling.fused`; grid + ``grid_sample`` for TPS)
``stnkit reference``   stnkit's plain path: ``transform.grid`` then ``stnkit.sample``
                       (matrix families only; TPS has only this path)
``torch``              ``F.affine_grid`` + ``F.grid_sample`` (affine only)
``kornia``             ``warp_affine`` / ``warp_perspective`` / ``warp_image_tps``
``opencv``             ``warpAffine`` / ``warpPerspective`` / ``remap`` (maps precomputed,
                       not timed), one image at a time, forward only, no gradients
=====================  ==================================================================

Timings: output megapixels per second (batch x H_out x W_out / seconds; channels
not counted), the median of ``--repeats`` calls after ``--warmup`` untimed calls.
Methods are measured interleaved (repeat 1 of every method, then repeat 2, ...)
in one process, so that a machine whose load changes during the run affects
every method alike. "fwd" runs under ``torch.no_grad()``; "fwd+bwd" back-propagates
a fixed random gradient to the images and to theta; "fwd+bwd (theta)" to theta
only, the spatial-transformer training case (the images are data).
torch and OpenCV use the same number of threads (``--threads``).

Usage::

    python benchmarks/warp.py --out benchmarks/results/warp.md
    python benchmarks/warp.py --quick            # 3 repeats, 1 warm-up
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

import stnkit
from stnkit import sample
from stnkit.sampling.fused import kernel_status

from _machine import cpu_model, load_average, write_report  # benchmarks/ is on sys.path when a script runs
from stnkit.transforms import get_transform

SIZES = [(256, 1, 28, 28), (256, 1, 60, 60), (64, 3, 224, 224), (1, 3, 2048, 2048)]
FAMILIES = ["affine", "projective", "tps"]
PASSES = ["fwd", "fwd+bwd", "fwd+bwd (theta)"]


def make_theta(family: str, batch: int) -> tuple[object, torch.Tensor]:
    """A transform and a mild random warp of each image (the same for every method)."""
    generator = torch.Generator().manual_seed(batch)
    if family == "tps":
        transform = get_transform({"name": "thin_plate_spline", "grid_size": [4, 4]})
        return transform, 0.05 * torch.randn(batch, transform.num_params, generator=generator)
    transform = get_transform(family)
    theta = transform.identity(batch) + 0.05 * torch.randn(batch, transform.num_params, generator=generator)
    if family == "projective":
        theta[:, 6:] *= 0.2
    return transform, theta


def methods(family: str, x: torch.Tensor, theta: torch.Tensor, transform) -> dict[str, Callable]:
    """name -> function(x, theta) returning the warped batch (differentiable except OpenCV)."""
    batch, channels, height, width = x.shape
    size = (height, width)
    out: dict[str, Callable] = {"stnkit.warp": lambda x, t: stnkit.warp(x, t, transform)}
    if family != "tps":
        out["stnkit reference"] = lambda x, t: sample(x, transform.grid(t, size))
    if family == "affine":
        out["torch"] = lambda x, t: F.grid_sample(
            x, F.affine_grid(t.view(-1, 2, 3), [x.shape[0], channels, height, width], align_corners=False), align_corners=False
        )
    try:
        import kornia.geometry.transform as KT
    except ImportError:
        KT = None
    if KT is not None and family in ("affine", "projective"):
        # kornia takes the forward (input -> output) pixel matrix and inverts it itself.
        def kornia_matrix(t):
            return torch.linalg.inv(transform.to_pixels(t, size, size).to(t.dtype))

        if family == "affine":
            out["kornia"] = lambda x, t: KT.warp_affine(x, kornia_matrix(t)[:, :2], size, align_corners=False)
        else:
            out["kornia"] = lambda x, t: KT.warp_perspective(x, kornia_matrix(t), size, align_corners=False)
    if KT is not None and family == "tps":
        from kornia.geometry.transform import get_tps_transform, warp_image_tps

        centres = transform.control_points(dtype=x.dtype).expand(batch, -1, -1)

        def kornia_tps(x, t):
            # kornia solves the spline from the control points to their displaced positions.
            moved = centres + t.view(batch, -1, 2)
            kernel_weights, affine_weights = get_tps_transform(centres, moved)
            return warp_image_tps(x, moved, kernel_weights, affine_weights, align_corners=False)

        out["kornia"] = kornia_tps
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        images = [np.ascontiguousarray(x[b].detach().permute(1, 2, 0).numpy()) for b in range(batch)]
        if family == "tps":
            with torch.no_grad():
                grid = transform.grid(theta, size).numpy()
            maps = [
                ((((g[..., 0] + 1) * width - 1) / 2).astype(np.float32), (((g[..., 1] + 1) * height - 1) / 2).astype(np.float32))
                for g in grid
            ]

            def opencv(x, t):
                return [cv2.remap(img, mx, my, cv2.INTER_LINEAR) for img, (mx, my) in zip(images, maps)]

        else:
            matrices = transform.to_pixels(theta, size, size).numpy()
            flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
            if family == "affine":

                def opencv(x, t):
                    return [cv2.warpAffine(img, m[:2], (width, height), flags=flags) for img, m in zip(images, matrices)]

            else:

                def opencv(x, t):
                    return [cv2.warpPerspective(img, m, (width, height), flags=flags) for img, m in zip(images, matrices)]

        opencv.no_grad = True  # type: ignore[attr-defined]
        out["opencv"] = opencv
    return out


def time_pass(
    function: Callable, x: torch.Tensor, theta: torch.Tensor, grad: torch.Tensor, pass_name: str
) -> tuple[float, float]:
    """Wall-clock and process CPU seconds for one call of ``function`` in the given pass."""
    if pass_name == "fwd":
        wall, cpu = time.perf_counter(), time.process_time()
        with torch.no_grad():
            function(x, theta)
        return time.perf_counter() - wall, time.process_time() - cpu
    xs = x.detach().requires_grad_(pass_name == "fwd+bwd")
    ts = theta.detach().requires_grad_(True)
    wall, cpu = time.perf_counter(), time.process_time()
    function(xs, ts).backward(grad)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_case(family: str, shape: tuple[int, ...], repeats: int, warmup: int) -> dict[tuple[str, str, str], float]:
    """Median MPix/s of every (method, pass, clock) for one family and shape, measured interleaved."""
    x = stnkit_images(shape)
    transform, theta = make_theta(family, shape[0])
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    table = methods(family, x, theta, transform)
    samples: dict[tuple[str, str, str], list[float]] = {}
    megapixels = shape[0] * shape[2] * shape[3] / 1e6
    for pass_name in PASSES:
        runnable = {k: f for k, f in table.items() if pass_name == "fwd" or not getattr(f, "no_grad", False)}
        for _ in range(warmup):
            for function in runnable.values():
                time_pass(function, x, theta, grad, pass_name)
        for _ in range(repeats):
            for name, function in runnable.items():
                wall, cpu = time_pass(function, x, theta, grad, pass_name)
                samples.setdefault((name, pass_name, "wall"), []).append(wall)
                samples.setdefault((name, pass_name, "cpu"), []).append(max(cpu, 1e-9))
    return {key: megapixels / statistics.median(values) for key, values in samples.items()}


def stnkit_images(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(0))


def bench_full_resolution(repeats: int, warmup: int) -> dict[tuple[str, str, str], float]:
    """MPix/s of :func:`stnkit.sampling.warp_image` against the torch pipelines on one 3x2048x2048 image."""
    from stnkit.sampling import warp_image

    x = stnkit_images((1, 3, 2048, 2048))
    hwc = np.ascontiguousarray(x[0].permute(1, 2, 0).numpy())
    hwc8 = (hwc * 255).astype(np.uint8)
    out: dict[tuple[str, str, str], list[float]] = {}
    for family in ("affine", "projective"):
        transform, theta = make_theta(family, 1)
        size = (2048, 2048)
        candidates = {
            "warp_image (float32 HxWx3)": lambda: warp_image(hwc, theta=theta, transform=transform),
            "warp_image (uint8 HxWx3)": lambda: warp_image(hwc8, theta=theta, transform=transform),
            "warp_image (tensor 3xHxW)": lambda: warp_image(x[0], theta=theta, transform=transform),
            "stnkit.warp (no grad)": lambda: stnkit.warp(x, theta, transform),
            "stnkit reference (no grad)": lambda: sample(x, transform.grid(theta, size)),
        }
        if family == "affine":
            candidates["torch affine_grid + grid_sample"] = lambda: F.grid_sample(
                x, F.affine_grid(theta.view(1, 2, 3), [1, 3, 2048, 2048], align_corners=False), align_corners=False
            )
        with torch.no_grad():
            for _ in range(warmup):
                for function in candidates.values():
                    function()
            for _ in range(repeats):
                for name, function in candidates.items():
                    wall, cpu = time.perf_counter(), time.process_time()
                    function()
                    out.setdefault((family, name, "wall"), []).append(time.perf_counter() - wall)
                    out.setdefault((family, name, "cpu"), []).append(max(time.process_time() - cpu, 1e-9))
    return {key: 2048 * 2048 / 1e6 / statistics.median(values) for key, values in out.items()}


def render_full_resolution(results: dict) -> str:
    lines = [
        "## Full-resolution no-grad warp (one 3x2048x2048 image)",
        "",
        "`stnkit.sampling.warp_image` (OpenCV warpAffine/warpPerspective with WARP_INVERSE_MAP) against the torch "
        "pipelines, MPix/s (median, interleaved), and its speed-up over the reference torch pipeline "
        "(affine_grid + grid_sample for affine, stnkit's grid + grid_sample for projective).",
        "",
        "| family | method | wall MPix/s | CPU MPix/s | speed-up (wall) | speed-up (CPU) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for family in ("affine", "projective"):
        base = "torch affine_grid + grid_sample" if family == "affine" else "stnkit reference (no grad)"
        names = [key[1] for key in results if key[0] == family and key[2] == "wall"]
        for name in names:
            wall, cpu = results[(family, name, "wall")], results[(family, name, "cpu")]
            lines.append(
                f"| {family} | {name} | {wall:.1f} | {cpu:.1f} | {wall / results[(family, base, 'wall')]:.2f}x | "
                f"{cpu / results[(family, base, 'cpu')]:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def render(results: dict, args: argparse.Namespace, header: dict[str, str]) -> str:
    lines = ["# Warp benchmark", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items()]
    lines += [
        "",
        "Output megapixels per second (batch x H x W / s; channels not counted), median of "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up call(s). Higher is better. "
        "\"fwd\" under no_grad; \"fwd+bwd\": gradients to images and theta; \"fwd+bwd (theta)\": to theta only. "
        "The speed-up tables divide stnkit.warp's numbers by the baseline's (torch = affine_grid + grid_sample; "
        "for projective, where PyTorch has no built-in, stnkit's own grid + grid_sample path).",
        "",
        "Two clocks: **wall** (elapsed time: what a user waits) and **CPU** (process CPU time summed over "
        "threads: the work done, much less sensitive to other processes on a shared machine).",
        "",
    ]
    order = ["stnkit.warp", "stnkit reference", "torch", "kornia", "opencv"]
    for clock, title in (("wall", "wall-clock"), ("cpu", "CPU time")):
        for family in FAMILIES:
            cases = [shape for shape in SIZES if (family, shape) in results]
            if not cases:
                continue
            lines += [f"## {family}, {title}", "", "| shape (N,C,H,W) | method | fwd | fwd+bwd | fwd+bwd (theta) |", "|---|---|---:|---:|---:|"]
            for shape in cases:
                res = results[(family, shape)]
                names = sorted({key[0] for key in res}, key=order.index)
                for name in names:
                    cells = [f"{res[(name, p, clock)]:.1f}" if (name, p, clock) in res else "-" for p in PASSES]
                    lines.append(f"| {tuple(shape)} | {name} | " + " | ".join(cells) + " |")
            lines += ["", f"stnkit.warp speed-up ({title}):", "", "| shape | over | fwd | fwd+bwd | fwd+bwd (theta) |", "|---|---|---:|---:|---:|"]
            for shape in cases:
                res = results[(family, shape)]
                for base in ("torch", "stnkit reference", "kornia", "opencv"):
                    if (base, "fwd", clock) not in res or (base == "stnkit reference" and family == "affine"):
                        continue
                    ratios = [
                        f"{res[('stnkit.warp', p, clock)] / res[(base, p, clock)]:.2f}x" if (base, p, clock) in res else "-"
                        for p in PASSES
                    ]
                    lines.append(f"| {tuple(shape)} | {base} | " + " | ".join(ratios) + " |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the markdown table here (e.g. benchmarks/results/warp.md)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch and OpenCV threads (default: torch's default)")
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warm-up")
    parser.add_argument("--skip-full-resolution", action="store_true", help="skip the warp_image (OpenCV) section")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    try:
        import cv2

        cv2.setNumThreads(threads)
        opencv_version = cv2.__version__
    except ImportError:
        opencv_version = "not installed"
    try:
        import kornia

        kornia_version = kornia.__version__
    except ImportError:
        kornia_version = "not installed"
    load_before = load_average()
    started = time.perf_counter()
    results = {}
    for family in args.families:
        for shape in SIZES:
            results[(family, shape)] = bench_case(family, shape, args.repeats, args.warmup)
            print(f"{family} {shape}: " + ", ".join(f"{k[0]} {k[1]} {v:.1f}" for k, v in results[(family, shape)].items() if k[2] == "wall"), flush=True)
    full = bench_full_resolution(args.repeats, args.warmup) if not args.skip_full_resolution else None
    header = {
        "machine": f"{cpu_model()}, {os.cpu_count()} logical cores, {threads} torch/OpenCV threads",
        "load average (1/5/15 min) before / after": f"{load_before} / {load_average()}",
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, kornia {kornia_version}, "
        f"OpenCV {opencv_version}, stnkit {getattr(stnkit, '__version__', '?')}",
        "fused kernel": kernel_status(),
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "duration": f"{time.perf_counter() - started:.0f} s",
    }
    text = render(results, args, header)
    if full is not None:
        text += "\n" + render_full_resolution(full)
    write_report(text + "\n", args.out)
    if not args.out:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
