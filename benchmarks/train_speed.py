"""Training speed of the ST-CNN against the same CNN without the transformer (CPU or GPU).

Both models are the distorted-MNIST classifiers of :mod:`stnkit.models.classifiers`
(``cnn`` and ``st-cnn`` with an affine transformer) on RTS-distorted digits
(42x42, :class:`stnkit.data.DistortedMNIST` over the digit sample shipped with
stnkit), batch 256, SGD with momentum. One training step = forward,
cross-entropy, backward, optimiser step. Steps of the models are interleaved
(one step of each in turn, in one process), so that changing machine load
affects them alike; the table reports the median step time of each.

The cost of the transformer is ``1 - t(cnn) / t(st-cnn)``: the share of an ST-CNN
step that the transformer (localisation net, warp, and the extra backward work it
causes) takes. The ST-CNN runs three times: with the default warp (the fused kernel,
:mod:`stnkit.sampling.fused`), with ``STNKIT_FUSED=0`` (grid + grid_sample), and
with the default warp plus the consistency loss of ``stnkit train --consistency 1``
(:mod:`stnkit.training.consistency`: a second, randomly warped view for the
localisation net).

``--profile`` adds a per-operator breakdown of one ST-CNN step (torch.profiler).
``--device cuda`` runs on a GPU (each step synchronised before the clock is read);
there the fused warp is the Triton kernel.

Usage::

    python benchmarks/train_speed.py --out benchmarks/results/train_speed.md
    python benchmarks/train_speed.py --quick --profile
    python benchmarks/train_speed.py --device cuda --out benchmarks/results/train_speed_gpu.md
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

import torch
import torch.nn.functional as F

import stnkit
from stnkit.data import DistortedMNIST
from stnkit.data.digits import load_digit_sample
from stnkit.models.classifiers import classifier
from stnkit.sampling.fused import kernel_status
from stnkit.training import TrainConfig, sampled_consistency_loss, tune_cpu_allocator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when loaded by a test
from _machine import cpu_model, load_average, write_report  # noqa: E402

DEFAULTS = TrainConfig()  # the training defaults, e.g. the consistency loss's similarity ranges


class Runner:
    """One model, its optimiser, and an environment to run its steps in."""

    def __init__(self, name: str, model: torch.nn.Module, fused: bool = True, consistency: float = 0.0) -> None:
        self.name = name
        self.model = model.train()
        self.fused = fused
        self.consistency = consistency
        self.optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor, record: bool = True) -> None:
        previous = os.environ.get("STNKIT_FUSED")
        os.environ["STNKIT_FUSED"] = "auto" if self.fused else "0"
        try:
            wall, cpu = time.perf_counter(), time.process_time()
            self.optimiser.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(x), y)
            if self.consistency:
                # As stnkit train --consistency W does it, with its default similarity ranges.
                loss = loss + self.consistency * sampled_consistency_loss(
                    self.model.transformer, x, rotation=DEFAULTS.consistency_rotation,
                    scale=DEFAULTS.consistency_scale, shift=DEFAULTS.consistency_shift,
                )  # fmt: skip
            loss.backward()
            self.optimiser.step()
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        finally:
            if previous is None:
                os.environ.pop("STNKIT_FUSED", None)
            else:
                os.environ["STNKIT_FUSED"] = previous
        if record:
            self.times.append(wall)
            self.cpu_times.append(cpu)


def profile_step(runner: Runner, x: torch.Tensor, y: torch.Tensor, rows: int = 18) -> str:
    from torch.profiler import ProfilerActivity, profile

    runner.step(x, y, record=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        runner.step(x, y, record=False)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write the markdown report here")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="8 steps, 2 warm-up")
    parser.add_argument("--profile", action="store_true", help="add a per-operator profile of one ST-CNN step")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("train_speed.py: --device cuda given but CUDA is not available")
        return 2
    if args.quick:
        args.steps, args.warmup = 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    # As the stnkit command does, so that the step is what `stnkit train` runs (docs/speed.md).
    allocator = "glibc thresholds raised (tune_cpu_allocator)" if tune_cpu_allocator() else "default"
    torch.manual_seed(0)
    images, labels = load_digit_sample("train")
    x_all, y_all = DistortedMNIST("rts", "train", images=images, labels=labels).epoch(0)
    x_all, y_all = x_all.to(device), y_all.to(device)
    runners = [
        Runner("cnn", classifier("cnn", None, (42, 42)).to(device)),
        Runner("st-cnn (fused warp, default)", classifier("st-cnn", "affine", (42, 42)).to(device), fused=True),
        Runner("st-cnn (grid + grid_sample)", classifier("st-cnn", "affine", (42, 42)).to(device), fused=False),
        Runner("st-cnn + consistency loss (fused warp)", classifier("st-cnn", "affine", (42, 42)).to(device), consistency=1.0),
    ]
    batches = len(x_all) // args.batch
    load_before = load_average()
    started = time.perf_counter()
    for step in range(args.warmup + args.steps):
        k = step % batches
        x, y = x_all[k * args.batch : (k + 1) * args.batch], y_all[k * args.batch : (k + 1) * args.batch]
        for runner in runners:
            runner.step(x, y, record=step >= args.warmup)
    duration = time.perf_counter() - started

    base = {clock: statistics.median(getattr(runners[0], attr)) for clock, attr in (("wall", "times"), ("cpu", "cpu_times"))}
    lines = [
        f"# Training speed: ST-CNN vs CNN ({'GPU' if device.type == 'cuda' else 'CPU'})",
        "",
        f"- **machine**: {cpu_model()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads "
        "(see the load average for other jobs)",
        *([f"- **device**: {torch.cuda.get_device_name(device)}"] if device.type == "cuda" else []),
        f"- **load average (1/5/15 min) before / after**: {load_before} / {load_average()}",
        f"- **software**: Python {platform.python_version()}, torch {torch.__version__}, stnkit {getattr(stnkit, '__version__', '?')}",
        f"- **fused kernel**: {kernel_status()}",
        f"- **allocator**: {allocator}",
        f"- **date**: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "- **command**: python "
        + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        f"- **setup**: RTS-distorted digits 42x42 (8,000-digit sample, epoch 0), batch {args.batch}, SGD momentum 0.9, "
        f"{args.steps} timed steps per model after {args.warmup} warm-up, interleaved; {duration:.0f} s in all",
        "",
        "Median over steps. *Transformer cost* = 1 - t(cnn) / t(model): the share of the model's step that the "
        "transformer takes. Wall = elapsed time; CPU = process CPU time (less sensitive to the other jobs).",
        "",
        "| model | wall ms/step | images/s (wall) | transformer cost (wall) | CPU ms/step | transformer cost (CPU) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for runner in runners:
        wall, cpu = statistics.median(runner.times), statistics.median(runner.cpu_times)
        cost_wall = "-" if runner is runners[0] else f"{100 * (1 - base['wall'] / wall):.1f}%"
        cost_cpu = "-" if runner is runners[0] else f"{100 * (1 - base['cpu'] / cpu):.1f}%"
        lines.append(
            f"| {runner.name} | {1e3 * wall:.1f} | {args.batch / wall:.0f} | {cost_wall} | {1e3 * cpu:.1f} | {cost_cpu} |"
        )
    if args.profile:
        x, y = x_all[: args.batch], y_all[: args.batch]
        for runner in runners:
            lines += ["", f"## Profile of one step: {runner.name}", "", "```", profile_step(runner, x, y), "```"]
    text = "\n".join(lines) + "\n"
    write_report(text, args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
