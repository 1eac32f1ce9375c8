"""Everything stnkit measures on a lent GPU, in one time-boxed run.

A GPU is lent to some sessions only, for minutes, so the GPU work is one
prepared script rather than a series of commands:

1. the GPU tests (``-m gpu``, and the CUDA branches of the files that have them);
   if the Triton kernels fail them, training (not the benchmarks, which report
   the default path) falls back to ``STNKIT_FUSED=0``;
2. ``benchmarks/warp_gpu.py`` and ``benchmarks/train_speed.py --device cuda``;
3. the distorted-MNIST training runs named by ``--jobs`` (default :data:`DEFAULT_JOBS`,
   one per cell; :data:`JOBS` has them all), side by side on the one GPU,
   each warping its training epochs on the GPU (on the CPU if that fails its test).
   Each first trains two epochs in a probe folder (``--max-steps``) to measure its
   own epoch time with all jobs running, then trains afresh with as many epochs
   of a single cosine schedule as fit before ``--budget`` runs out. ``--seeds``
   runs every job once per training seed (as ``JOB-sSEED``): one seed's score is
   not a recipe's (on R, seeds 21 and 22 of one recipe ended at 0.70 and 0.91%);
4. with ``--average-copies K``, an averaging phase after the cosine runs (not in the
   paper): each finished run is fine-tuned K times side by side at a constant
   learning rate, each copy with its own seed and a moving average of its weights,
   and the K moving averages are averaged into ``runs/RUN-soup.safetensors``
   (``stnkit average``). This is the recipe that brought R to 0.68% on the CPU
   (RESULTS.md §1, fourteenth session); ``--average-share`` sets the part of the
   training time it gets.

Everything lands in ``--out``: logs, the benchmark tables and each run's folder
(checkpoints, metrics, learning curve); ``--archive`` packs it all into one file. Score the
returned checkpoints anywhere with ``stnkit eval RUN/checkpoints/last.safetensors
--task TASK --test-seed S``.

Usage (on the GPU machine, from the repository root, stnkit importable)::

    STNKIT_DATA=.data python3 scripts/gpu_session.py --out /tmp/gpu --archive "$OUT/gpu_session.tgz" --budget 540
    python scripts/gpu_session.py --out /tmp/dry --budget 150 --device cpu --train-limit 2000 --skip tests  # dry run
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 128  # run 3 (batch 256, the paper's) trailed the CPU runs at 128 on every cell at equal epochs
RECIPE = [
    "--optimizer", "adam", "--lr", "0.002", "--loc-lr-scale", "0.3",
    "--batch-size", str(BATCH), "--max-grad-norm", "5",
]  # fmt: skip
SEEDS = (21,)  # training seeds; the test sets have their own (``stnkit eval --test-seed``)
# name -> (task, model, transform, extra flags)
JOBS: dict[str, tuple[str, str, str, list[str]]] = {
    "rts-affine": ("rts", "st-cnn", "affine", []),
    "rts-affine-wd": ("rts", "st-cnn", "affine", ["--weight-decay", "1e-4"]),
    "rotated-affine-wd": ("rotated", "st-cnn", "affine", ["--weight-decay", "1e-4"]),
    "rotated-affine-drop": ("rotated", "st-cnn", "affine", ["--dropout", "0.25"]),
    "projective-projective": ("projective", "st-cnn", "projective", []),
    "elastic-tps": ("elastic", "st-cnn", "tps", []),
    "rts-affine-drop": ("rts", "st-cnn", "affine", ["--dropout", "0.25"]),
    "rts-affine-drop-wd": ("rts", "st-cnn", "affine", ["--dropout", "0.25", "--weight-decay", "1e-4"]),
    "rotated-affine-drop-wd3": ("rotated", "st-cnn", "affine", ["--dropout", "0.25", "--weight-decay", "3e-4"]),
    "projective-projective-drop": ("projective", "st-cnn", "projective", ["--dropout", "0.25"]),
    # training-only elastic jitter (not in the paper; test sets untouched): RESULTS.md §1, ninth session
    "rotated-affine-drop-jit1": ("rotated", "st-cnn", "affine", ["--dropout", "0.25", "--jitter-px", "1"]),
    # a rotation-only transformer for R (3 parameters): RESULTS.md §1, ninth session
    "rotated-rotation-drop": ("rotated", "st-cnn", "rotation", ["--dropout", "0.25"]),
    # two transformer rounds from the start, for R: RESULTS.md §1, tenth session
    "rotated-affine-drop-it2": ("rotated", "st-cnn", "affine", ["--dropout", "0.25", "--iterations", "2"]),
    # ...and with a moving average of the weights (checkpoints/ema.safetensors), not in the paper.
    "rotated-affine-drop-it2-ema": ("rotated", "st-cnn", "affine", ["--dropout", "0.25", "--iterations", "2", "--ema-decay", "0.9995"]),
    "rts-affine-drop-wd-it2-ema": ("rts", "st-cnn", "affine",
                                   ["--dropout", "0.25", "--weight-decay", "1e-4", "--iterations", "2", "--ema-decay", "0.9995"]),
    # the consistency loss (not in the paper): RESULTS.md §1, eighteenth session (RTS 0.62% in 100 CPU epochs)
    "rts-affine-drop-wd-cons": ("rts", "st-cnn", "affine", ["--dropout", "0.25", "--weight-decay", "1e-4", "--consistency", "1"]),
    "projective-projective-cons": ("projective", "st-cnn", "projective", ["--consistency", "1"]),
}
# One job per cell by default, each the best recipe measured on the CPU (RESULTS.md §1); the
# other variants run only when --jobs names them.
DEFAULT_JOBS = ("rts-affine-drop-wd-cons", "rotated-affine-drop", "projective-projective", "elastic-tps")
PROBE_EPOCHS = 2
MAX_EPOCHS = 600
# The averaging phase's fine-tune (RESULTS.md §1, fourteenth session: R, from a finished two-round run).
AVERAGE_LR = 5e-4
AVERAGE_EMA_DECAY = 0.9998
# Flags (each with one value) a fine-tune from a checkpoint cannot take (the model comes from the
# checkpoint) or sets itself.
_NOT_FOR_INIT = {"--dropout", "--iterations", "--ema-decay"}


def stnkit_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "stnkit.cli.main", *args]


class Session:
    def __init__(self, out: Path, budget: float, device: str) -> None:
        self.out, self.budget, self.device = out, budget, device
        self.started = time.monotonic()
        self.log = open(out / "session.log", "a", encoding="utf-8")

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def run(self, name: str, command: list[str], timeout: float, env: dict | None = None) -> int:
        self.say(f"{name}: {' '.join(command)} (timeout {timeout:.0f}s)")
        with open(self.out / f"{name}.log", "w", encoding="utf-8") as log:
            try:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=ROOT).returncode
            except subprocess.TimeoutExpired:
                code = 124
        self.say(f"{name}: exit {code}")
        return code


def epoch_seconds(run_dir: Path) -> float | None:
    """Seconds per epoch from a run's metrics (epoch 1 minus epoch 0, so start-up is left out)."""
    try:
        with open(run_dir / "metrics.csv", encoding="utf-8") as handle:
            times = {int(row["epoch"]): float(row["time"]) for row in csv.DictReader(handle) if row.get("time")}
    except (OSError, ValueError, KeyError):
        return None
    if 0 in times and 1 in times:
        return times[1] - times[0]
    return None


def _wait_until(process: subprocess.Popen, seconds: float) -> bool:
    """Wait for ``process`` at most ``seconds`` (at least 1); stop it after that. True if it ended by itself."""
    try:
        process.wait(timeout=max(seconds, 1))
        return True
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait(timeout=20)
        return False


def runs_of(jobs: list[str], seeds: tuple[int, ...] | list[int]) -> dict[str, tuple[str, int]]:
    """Run name -> (job, training seed): one run per job and seed, named ``JOB-sSEED`` when there are several seeds.

    >>> runs_of(["elastic-tps"], [21])
    {'elastic-tps': ('elastic-tps', 21)}
    >>> list(runs_of(["elastic-tps"], [21, 22]))
    ['elastic-tps-s21', 'elastic-tps-s22']
    """
    if len(seeds) == 1:
        return {job: (job, seeds[0]) for job in jobs}
    return {f"{job}-s{seed}": (job, seed) for job in jobs for seed in seeds}


def average_phase_flags(job_flags: list[str], seed: int, copy: int, epochs: int) -> list[str]:
    """The ``stnkit train`` flags of copy ``copy`` of a job's averaging phase (after ``--init RUN``).

    The job's own flags are kept except those that describe the model, which now comes
    from the checkpoint, and its moving average, which the phase sets.

    >>> average_phase_flags(["--dropout", "0.25", "--weight-decay", "1e-4", "--iterations", "2"], 21, 1, 30)
    ['--weight-decay', '1e-4', '--seed', '1121', '--epochs', '30', '--schedule', 'step', '--lr', '0.0005', '--ema-decay', '0.9998']
    """
    kept, skip_value = [], False
    for flag in job_flags:
        if skip_value:
            skip_value = False
        elif flag in _NOT_FOR_INIT:
            skip_value = True
        else:
            kept.append(flag)
    return [
        *kept, "--seed", str(1000 + 100 * copy + seed), "--epochs", str(epochs),
        "--schedule", "step", "--lr", str(AVERAGE_LR), "--ema-decay", str(AVERAGE_EMA_DECAY),
    ]  # fmt: skip


def train(
    session: Session, runs: Path, env: dict, jobs: list[str], train_limit: int | None, reserve: float, flags: list[str],
    seeds: tuple[int, ...] | list[int] = SEEDS, average_copies: int = 0, average_share: float = 0.25,
) -> None:
    """Probe the ``jobs`` (names in :data:`JOBS`) for two epochs side by side, then train each afresh with the epochs that fit.

    Every job runs once per training seed in ``seeds`` (see :func:`runs_of`). With
    ``average_copies`` > 0, ``average_share`` of the time left after the probes goes to
    the averaging phase (module docstring, step 4).
    """
    planned = runs_of(jobs, seeds)
    # Each job's data generation and evaluation use CPU threads: share the cores out. Left at
    # torch's default (every core per job), five jobs on 16 cores took 20 s an epoch against
    # 2.4 s for one job with 8 threads (H200 machine, 2026-11-26).
    env = dict(env)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(planned))))  # a caller's choice wins
    limit = ["--train-limit", str(train_limit)] if train_limit else []
    common = ["--device", session.device, "--no-progress", "--checkpoint-every", "100000", *flags]

    def launch(
        name: str, folder: Path, extra: list[str], job_flags: bool = True, job_seed: tuple[str, int] | None = None,
    ) -> subprocess.Popen:
        # job_seed names the recipe of a run that is not in `planned` (an averaging copy).
        job, seed = job_seed or planned[name]
        task, model, transform, flags = JOBS[job]
        # Later flags win in click, so the averaging phase's --seed/--epochs/--lr override the recipe's.
        command = stnkit_command(
            "train", "--task", task, "--model", model, "--transform", transform, "--out", str(folder / name),
            *RECIPE, "--seed", str(seed), *(flags if job_flags else []), *limit, *common, *extra,
        )  # fmt: skip
        session.say(f"start {name}: {' '.join(command[3:])}")
        log = open(folder / f"{name}.log", "a", encoding="utf-8")
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    probe_dir = runs.parent / "probe"
    probe_dir.mkdir(exist_ok=True)
    probes = {}
    for name in planned:
        steps = math.ceil((train_limit or 60000) / BATCH) * PROBE_EPOCHS
        probes[name] = launch(name, probe_dir, ["--epochs", str(MAX_EPOCHS), "--max-steps", str(steps)])
    for name, process in probes.items():
        _wait_until(process, session.left() - reserve)
        session.say(f"probe {name}: exit {process.returncode}, {epoch_seconds(probe_dir / name)} s/epoch")

    finals, per_epochs = {}, {}
    # The averaging phase's share is set aside now, so that the cosine runs end in time for it.
    phase_reserve = average_share * (session.left() - reserve) if average_copies > 0 else 0.0
    for name in planned:
        per_epoch = epoch_seconds(probe_dir / name)
        if per_epoch is None:
            session.say(f"skip {name}: its probe did not finish two epochs (see probe/{name}.log)")
            continue
        # 10% margin and 20 s of start-up; jobs that end early only speed up the others.
        epochs = int(0.9 * (session.left() - reserve - phase_reserve - 20) / per_epoch)
        epochs = min(max(epochs, 1), MAX_EPOCHS)
        session.say(f"{name}: {per_epoch:.2f} s/epoch -> {epochs} epochs")
        finals[name], per_epochs[name] = launch(name, runs, ["--epochs", str(epochs)]), per_epoch
    finished = []
    for name, process in finals.items():
        if not _wait_until(process, session.left() - reserve - phase_reserve):
            session.say(f"{name}: stopped at the deadline; its last checkpoint is mid-schedule")
        session.say(f"final {name}: exit {process.returncode}")
        if process.returncode == 0:
            finished.append(name)
    if average_copies > 0 and finished:
        average_phase(session, runs, env, finished, planned, per_epochs, average_copies, reserve, launch)


def average_phase(
    session: Session, runs: Path, env: dict, finished: list[str], planned: dict[str, tuple[str, int]],
    per_epochs: dict[str, float], copies: int, reserve: float, launch,
) -> None:
    """Fine-tune each finished run ``copies`` times side by side, then average the copies' moving averages."""
    # The probes ran len(planned) jobs side by side; the phase runs len(finished) * copies.
    crowding = len(finished) * copies / len(planned)
    started = {}
    for name in finished:
        job, seed = planned[name]
        per_epoch = per_epochs[name] * max(crowding, 1.0)
        epochs = min(max(int(0.9 * (session.left() - reserve - 40) / per_epoch), 1), MAX_EPOCHS)
        session.say(f"average {name}: {copies} copies of {epochs} epochs (~{per_epoch:.2f} s/epoch)")
        for copy in range(copies):
            copy_name = f"{name}-avg{copy}"
            extra = ["--init", str(runs / name / "checkpoints" / "last.safetensors"),
                     *average_phase_flags(JOBS[job][3], seed, copy, epochs)]  # fmt: skip
            started.setdefault(name, []).append((copy_name, launch(copy_name, runs, extra, job_flags=False, job_seed=(job, seed))))
    for name, copies_started in started.items():
        emas = []
        for copy_name, process in copies_started:
            if not _wait_until(process, session.left() - reserve - 20):
                session.say(f"{copy_name}: stopped at the deadline; its moving average is mid-phase")
            ema = runs / copy_name / "checkpoints" / "ema.safetensors"
            session.say(f"average {copy_name}: exit {process.returncode}, {'has' if ema.is_file() else 'no'} {ema.name}")
            if ema.is_file():
                emas.append(str(ema))
        if emas:
            soup = runs / f"{name}-soup.safetensors"
            session.run(f"{name}-soup", stnkit_command("average", *emas, "-o", str(soup), "--overwrite"), timeout=60, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="working folder: logs, tables, runs/")
    parser.add_argument("--archive", type=Path, default=None, help="pack --out into this .tgz at the end")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole session")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--train-limit", type=int, default=None, help="training digits per epoch (dry runs)")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: tests,bench,train")
    parser.add_argument("--jobs", default=",".join(DEFAULT_JOBS), help=f"comma-separated training jobs, some of {', '.join(JOBS)} (default: {', '.join(DEFAULT_JOBS)})")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated training seeds: each job runs once per seed")
    parser.add_argument("--average-copies", type=int, default=0,
                        help="fine-tunes per finished run in the averaging phase (0: no phase; R's recipe used 4)")
    parser.add_argument("--average-share", type=float, default=0.25, help="part of the training time for the averaging phase")
    args = parser.parse_args(argv)
    jobs = list(dict.fromkeys(filter(None, args.jobs.split(","))))
    try:
        seeds = list(dict.fromkeys(int(seed) for seed in args.seeds.split(",") if seed.strip()))
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not seeds or min(seeds) < 0:
        parser.error(f"--seeds: expected one or more integers >= 0, got {args.seeds!r}")
    if args.average_copies < 0 or not 0 < args.average_share < 1:
        parser.error(f"--average-copies must be >= 0 and --average-share in (0, 1), got {args.average_copies}, {args.average_share}")
    unknown = set(jobs) - set(JOBS)
    if unknown or not jobs:
        named = f"unknown job(s) {', '.join(sorted(unknown))}" if unknown else "no job named"
        parser.error(f"--jobs: {named}; expected some of {', '.join(JOBS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    session = Session(args.out, args.budget, args.device)
    skip = set(filter(None, args.skip.split(",")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    env.setdefault("STNKIT_DATA", str(ROOT / ".data"))
    env.setdefault("MPLBACKEND", "Agg")
    train_env = dict(env)
    train_flags: list[str] = []
    session.say(f"python {sys.version.split()[0]}, budget {args.budget:.0f}s, device {args.device}, data {env['STNKIT_DATA']}")
    probe = "import torch; print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-')"
    if session.run("versions", [sys.executable, "-c", probe], timeout=60, env=env) != 0:
        print((args.out / "versions.log").read_text(encoding="utf-8"))
        return 1
    print((args.out / "versions.log").read_text(encoding="utf-8"))

    if "tests" not in skip:
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
        code = session.run("pytest_gpu", [*pytest, "-m", "gpu", "tests"], timeout=120, env=env)
        session.run(
            "pytest_cuda_branches",
            [*pytest, "-k", "cuda or gpu or device", "tests/test_triton_warp.py", "tests/test_fused.py",
             "tests/test_tps.py", "tests/test_displacement.py", "tests/test_mixed_precision.py"],
            timeout=120, env=env,
        )  # fmt: skip
        for name in ("pytest_gpu", "pytest_cuda_branches"):
            print(name, (args.out / f"{name}.log").read_text(encoding="utf-8").strip().splitlines()[-1:])
        if code != 0:
            train_env["STNKIT_FUSED"] = "0"
            session.say("GPU tests failed: training runs with STNKIT_FUSED=0 (grid + grid_sample)")
        distort_test = [*pytest, "-m", "gpu", "tests/test_data_distortions.py"]
        if session.run("pytest_gpu_distortions", distort_test, timeout=60, env=env) != 0:
            train_flags.extend(["--data-device", "cpu"])
            session.say("CUDA distortions failed their test: training epochs are warped on the CPU")
    if "bench" not in skip:
        bench = [sys.executable]
        session.run("warp_gpu", [*bench, "benchmarks/warp_gpu.py", "--device", args.device, "--out", str(args.out / "warp_gpu.md")], 120, env)
        session.run(
            "train_speed_gpu",
            [*bench, "benchmarks/train_speed.py", "--device", args.device, "--steps", "30", "--warmup", "5",
             "--out", str(args.out / "train_speed_gpu.md")],
            90, env,
        )  # fmt: skip
    runs = args.out / "runs"
    runs.mkdir(exist_ok=True)
    if "train" not in skip:
        train(session, runs, train_env, jobs, args.train_limit, reserve=15, flags=train_flags, seeds=seeds,
              average_copies=args.average_copies, average_share=args.average_share)
    for table in ("warp_gpu.md", "train_speed_gpu.md"):
        if (args.out / table).exists():
            print((args.out / table).read_text(encoding="utf-8"))
    if args.archive:
        session.log.close()
        with tarfile.open(args.archive, "w:gz") as archive:
            # The probes' checkpoints are throw-away; their logs and metrics are kept.
            archive.add(args.out, arcname="gpu_session", filter=_without_probe_checkpoints)
        print(f"wrote {args.archive}")
    return 0


def _without_probe_checkpoints(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    parts = Path(member.name).parts
    return None if "probe" in parts and "checkpoints" in parts else member


if __name__ == "__main__":
    raise SystemExit(main())
