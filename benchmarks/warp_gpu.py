"""Benchmark warping on a GPU: stnkit's Triton kernels against ``affine_grid`` + ``grid_sample``.

For the affine and projective families and the batch shapes (256,1,28,28),
(256,1,60,60), (64,3,224,224) and (1,3,2048,2048) (output size = input size),
each method warps the same float32 CUDA images by the same maps:

=====================  ==================================================================
``stnkit.warp``        the default path on CUDA: the fused Triton kernels
                       (:mod:`stnkit.sampling.triton_warp`), forward and backward
``stnkit reference``   stnkit's plain path, the one ``STNKIT_FUSED=0`` selects:
                       ``transform.grid`` then ``stnkit.sample`` (``grid_sample`` underneath)
``torch``              ``F.affine_grid`` + ``F.grid_sample`` (affine only)
=====================  ==================================================================

Timings are the median of ``--repeats`` calls after ``--warmup`` untimed calls,
each call timed with CUDA events; methods are interleaved (repeat 1 of every
method, then repeat 2, ...). "fwd" runs under ``torch.no_grad()``; "fwd+bwd"
back-propagates a fixed random gradient to the images and to theta.

Bandwidth counts the fewest bytes a pass must move: forward, the input read once
and the output written once; forward+backward adds the output gradient read, the
input read again (for theta's gradient) and the input gradient written. It is
given against the device-to-device copy rate measured in the same run (bytes
read plus bytes written), the practical ceiling of a memory-bound kernel.

Every method's output is checked against ``torch`` (affine) or the reference
(projective) before timing; the largest difference is in the table.

Usage::

    python benchmarks/warp_gpu.py --out benchmarks/results/warp_gpu.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F

import stnkit
from stnkit import sample
from stnkit.sampling.fused import kernel_status
from stnkit.transforms import get_transform

from _machine import write_report  # benchmarks/ is on sys.path when a script runs

SIZES = [(256, 1, 28, 28), (256, 1, 60, 60), (64, 3, 224, 224), (1, 3, 2048, 2048)]
FAMILIES = ["affine", "projective"]
PASSES = ["fwd", "fwd+bwd"]
BYTES_PER_VALUE = 4  # float32


class Timer:
    """Time one call: CUDA events on a GPU, the host clock (after a synchronise) elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        import time

        began = time.perf_counter()
        fn()
        return time.perf_counter() - began


def copy_bandwidth(device: torch.device, timer: Timer, megabytes: int = 1024, repeats: int = 10) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    source = torch.rand(megabytes * 2**20 // BYTES_PER_VALUE, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    seconds = statistics.median(timer(lambda: target.copy_(source)) for _ in range(repeats))
    return 2 * source.numel() * BYTES_PER_VALUE / seconds


def make_theta(family: str, batch: int, device: torch.device) -> tuple[object, torch.Tensor]:
    """A transform and a mild random warp of each image (the same for every method)."""
    generator = torch.Generator().manual_seed(batch)
    transform = get_transform(family)
    theta = transform.identity(batch) + 0.05 * torch.randn(batch, transform.num_params, generator=generator)
    if family == "projective":
        theta[:, 6:] *= 0.2
    return transform, theta.to(device)


def methods(family: str, shape: tuple[int, int, int, int], transform) -> dict[str, Callable]:
    """name -> function(x, theta) returning the warped batch."""
    batch, channels, height, width = shape

    out: dict[str, Callable] = {
        "stnkit.warp": lambda x, t: stnkit.warp(x, t, transform),
        "stnkit reference": lambda x, t: sample(x, transform.grid(t, (height, width))),
    }
    if family == "affine":
        out["torch"] = lambda x, t: F.grid_sample(
            x, F.affine_grid(t.view(-1, 2, 3), [batch, channels, height, width], align_corners=False), align_corners=False
        )
    return out


def pass_call(fn: Callable, x: torch.Tensor, theta: torch.Tensor, grad: torch.Tensor, kind: str) -> Callable[[], object]:
    if kind == "fwd":

        def run():
            with torch.no_grad():
                return fn(x, theta)

        return run
    x_leaf, theta_leaf = x.clone().requires_grad_(True), theta.clone().requires_grad_(True)

    def run_backward():
        x_leaf.grad = theta_leaf.grad = None
        fn(x_leaf, theta_leaf).backward(grad)

    return run_backward


def minimum_bytes(shape: tuple[int, int, int, int], kind: str) -> int:
    values = shape[0] * shape[1] * shape[2] * shape[3]
    reads_and_writes = 2 if kind == "fwd" else 5
    return reads_and_writes * values * BYTES_PER_VALUE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run of the script itself")
    parser.add_argument("--sizes", default=None, help="e.g. 256x1x28x28,1x3x2048x2048 (default: the four above)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("warp_gpu.py: needs a CUDA device (torch.cuda.is_available() is False); use --device cpu for a dry run")
        return 2
    sizes = SIZES if not args.sizes else [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    timer = Timer(device)
    ceiling = copy_bandwidth(device, timer, megabytes=1024 if device.type == "cuda" else 64)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    rows = []
    for shape in sizes:
        for family in FAMILIES:
            transform, theta = make_theta(family, shape[0], device)
            generator = torch.Generator(device=device).manual_seed(1)
            x = torch.rand(shape, generator=generator, device=device)
            grad = torch.randn(shape, generator=generator, device=device)
            funcs = methods(family, shape, transform)
            with torch.no_grad():
                baseline = funcs["torch" if "torch" in funcs else "stnkit reference"](x, theta)
                differences = {m: float((f(x, theta) - baseline).abs().max()) for m, f in funcs.items()}
            for kind in PASSES:
                calls = {m: pass_call(f, x, theta, grad, kind) for m, f in funcs.items()}
                for _ in range(args.warmup):
                    for call in calls.values():
                        call()
                times: dict[str, list[float]] = {m: [] for m in calls}
                for _ in range(args.repeats):
                    for m, call in calls.items():
                        times[m].append(timer(call))
                medians = {m: statistics.median(t) for m, t in times.items()}
                rows.append((shape, family, kind, medians, differences))
            del x, grad
            if device.type == "cuda":
                torch.cuda.empty_cache()

    lines = [
        "# Warping on the GPU: stnkit (Triton) vs affine_grid + grid_sample",
        "",
        f"- **device**: {name}; device-to-device copy measured at **{ceiling / 1e9:.0f} GB/s** (read + write)",
        f"- **software**: Python {platform.python_version()}, torch {torch.__version__}, "
        f"triton {_version('triton')}, stnkit {getattr(stnkit, '__version__', '?')}",
        f"- **fused kernel**: {kernel_status()}",
        f"- **date**: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "- **command**: python "
        + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        f"- **timing**: median of {args.repeats} calls after {args.warmup} warm-up, CUDA events, methods interleaved",
        "",
        "Speed-up = baseline time / stnkit.warp time, where the baseline is `torch` for affine and "
        "`stnkit reference` (grid + grid_sample) for projective. Bandwidth: fewest bytes of the pass / time, "
        "and its share of the measured copy rate.",
        "",
        "| shape | family | pass | stnkit.warp ms | reference ms | torch ms | speed-up | stnkit GB/s | % of copy | max abs diff |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, family, kind, medians, differences in rows:
        ours = medians["stnkit.warp"]
        base = medians.get("torch", medians["stnkit reference"])
        rate = minimum_bytes(shape, kind) / ours
        torch_ms = f"{1e3 * medians['torch']:.3f}" if "torch" in medians else "-"
        lines.append(
            f"| {'x'.join(map(str, shape))} | {family} | {kind} | {1e3 * ours:.3f} | {1e3 * medians['stnkit reference']:.3f} | "
            f"{torch_ms} | {base / ours:.2f}x | {rate / 1e9:.0f} | {100 * rate / ceiling:.0f}% | "
            f"{differences['stnkit.warp']:.1e} |"
        )
    text = "\n".join(lines) + "\n"
    write_report(text, args.out)
    print(text)
    return 0


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(main())
