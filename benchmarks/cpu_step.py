"""What the CPU training step gains from stnkit's convolution backward and allocator setting.

Two things slowed the distorted-MNIST models' CPU training step, both outside
the transformer (``src/stnkit/modules/conv.py``, ``src/stnkit/training/allocator.py``):

* oneDNN's gradients of the classifier's first convolution (9x9, one input
  channel). :class:`stnkit.modules.InputGradConv2d` computes the input gradient
  by im2col and, for one channel, the weight gradient as one convolution with
  the batch as channels. The competitor is plain ``torch.nn.Conv2d`` (oneDNN),
  which is what the layer would be without stnkit.
* glibc returning large freed blocks to the kernel, so that every step
  zero-fills fresh pages. :func:`stnkit.training.tune_cpu_allocator` keeps them;
  the ``stnkit`` command calls it at start-up.

The script runs one child process per allocator setting (glibc's default, and
tuned); in each, the steps of the four model variants (CNN and RTS ST-CNN, each
with the first convolution as stnkit's layer or as ``nn.Conv2d``) are
interleaved, so that a change in machine load affects them alike. A step is
forward, cross-entropy, backward and an Adam update on a batch of RTS digits
(42x42, from the digit sample shipped with stnkit), the recipe of the long runs
in ``benchmarks/RESULTS.md``. The table gives the median wall time per step.

Usage::

    python benchmarks/cpu_step.py --out benchmarks/results/cpu_step.md
    python benchmarks/cpu_step.py --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded by a test
from _machine import cpu_model, load_average, write_report  # noqa: E402

VARIANTS = ("cnn", "st-cnn")
CONVS = ("stnkit", "nn.Conv2d")
ALLOCATORS = ("glibc default", "tuned")


def _with_plain_first_conv(model: nn.Module) -> nn.Module:
    """The same model with the classifier's first layer as a plain nn.Conv2d (same weights)."""
    first = model.classifier[0]
    plain = nn.Conv2d(first.in_channels, first.out_channels, first.kernel_size, first.stride, first.padding)
    plain.load_state_dict(first.state_dict())
    model.classifier[0] = plain
    return model


def measure(steps: int, warmup: int, batch: int) -> dict[str, float]:
    """Median step time (s) of each model variant, in this process."""
    from stnkit.data import DistortedMNIST
    from stnkit.data.digits import load_digit_sample
    from stnkit.models.classifiers import classifier

    images, labels = load_digit_sample("train")
    x, _ = DistortedMNIST("rts", "train", seed=0, images=images, labels=labels).epoch(0)
    x, y = x[:batch], torch.from_numpy(labels[:batch].astype("int64"))
    runners = {}
    for model_name in VARIANTS:
        for conv in CONVS:
            torch.manual_seed(0)
            model = classifier(model_name, "affine" if model_name == "st-cnn" else None, (42, 42))
            if conv == "nn.Conv2d":
                model = _with_plain_first_conv(model)
            model.train()
            runners[f"{model_name} | {conv}"] = (model, torch.optim.Adam(model.parameters(), lr=1e-4), [])
    for index in range(warmup + steps):
        for model, optimiser, times in runners.values():
            started = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimiser.step()
            if index >= warmup:
                times.append(time.perf_counter() - started)
    return {name: statistics.median(times) for name, (_, _, times) in runners.items()}


def _child(args: argparse.Namespace) -> int:
    if args.allocator == "tuned":
        from stnkit.training import tune_cpu_allocator

        if not tune_cpu_allocator():
            print(json.dumps({"error": "tune_cpu_allocator() changed nothing here (not glibc, or MALLOC_* set)"}))
            return 1
    print(json.dumps(measure(args.steps, args.warmup, args.batch)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the markdown report here")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="4 steps, 1 warm-up, batch 32")
    parser.add_argument("--allocator", choices=ALLOCATORS, default=None, help=argparse.SUPPRESS)  # child processes
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch = 4, 1, 32
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allocator is not None:
        return _child(args)

    started, load_before = time.time(), load_average()
    results = {}
    for allocator in ALLOCATORS:
        env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
        command = [sys.executable, __file__, "--allocator", allocator, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch)]  # fmt: skip
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            return done.returncode
        results[allocator] = json.loads(done.stdout.strip().splitlines()[-1])

    baseline = {model: results["glibc default"][f"{model} | nn.Conv2d"] for model in VARIANTS}
    rows = ["| model | first convolution | allocator | ms/step | images/s | speed-up |", "|---|---|---|---:|---:|---:|"]
    for model in VARIANTS:
        for allocator in ALLOCATORS:
            for conv in CONVS[::-1]:
                seconds = results[allocator][f"{model} | {conv}"]
                rows.append(f"| {model} | {conv} | {allocator} | {1000 * seconds:.1f} | {args.batch / seconds:,.0f} | "
                            f"{baseline[model] / seconds:.2f}x |")  # fmt: skip
    command = "python benchmarks/cpu_step.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    report = "\n".join([
        "# CPU training step: stnkit's first-convolution backward and allocator setting",
        "",
        f"- **machine**: {cpu_model()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads",
        f"- **load average before / after**: {load_before} / {load_average()}",
        f"- **software**: Python {sys.version.split()[0]}, torch {torch.__version__}",
        f"- **date**: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} ({time.time() - started:.0f} s in all)",
        f"- **command**: {command.strip()}",
        f"- **setup**: RTS digits 42x42 (digit sample), batch {args.batch}, Adam; {args.steps} timed steps per variant "
        f"after {args.warmup} warm-up, the four variants interleaved, one child process per allocator setting",
        "",
        "Median wall time per step. Speed-up: against the same model with `nn.Conv2d` and glibc's default allocator.",
        "",
        *rows,
        "",
    ])  # fmt: skip
    print(report)
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
