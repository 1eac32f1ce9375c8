"""Benchmark image alignment on the HomographyNet protocol: classical baselines vs stnkit.

Protocol (DeTone et al., 2016): each held-out built-in photo (never used for
training, see :mod:`stnkit.data.images`) is made greyscale and resized to
320x240; a 128x128 patch is cut at random and its corners are moved by up to
``rho`` pixels (:func:`stnkit.data.pairs.make_benchmark_pairs`, fixed seed).
Three settings: ``rho=32``, ``rho=16``, and ``rho=32`` restricted to affine
maps. Each method estimates ``support_pix_from_input_pix``; the score is the
mean average corner error (MACE) in pixels over the patch's four corners.
A method that fails scores as the identity (counted under "fallbacks").

Timing: wall time per pair of the full call (image conversion included),
after one untimed warm-up call per method; OpenCV and torch use ``--threads``
threads (default: every core of the machine), set once for all methods.

Usage::

    python benchmarks/align.py --pairs 200 --seed 0 --out benchmarks/results/align.md
    python benchmarks/align.py --pairs 50 --model path/to/aligner.safetensors
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from stnkit.data.images import builtin_photos
from stnkit.data.pairs import HomographyPair, make_benchmark_pairs
from stnkit.evaluation.classical import run_classical
from stnkit.evaluation.metrics import mace, summarise

PATCH = 128

#: (label, rho, affine_only)
SETTINGS = [("32", 32, False), ("16", 16, False), ("32 (affine)", 32, True)]

#: registry key -> label in the table
CLASSICAL_ROWS = {
    "identity": "identity (no alignment)",
    "ecc": "ECC (100 it, eps 1e-5)",
    "ecc_defaults": "ECC, OpenCV default criteria (50 it, eps 1e-3)",
    "ecc_pyramid": "ECC, 3-level pyramid (tuned)",
    "orb_ransac": "ORB + RANSAC",
    "sift_ransac": "SIFT + RANSAC",
}


@dataclass
class Method:
    label: str
    run: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, bool]]  # -> (matrix, ok)


def classical_method(key: str) -> Method:
    def run(input_image: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, bool]:
        result = run_classical(key, input_image, support)
        return result.matrix, result.ok

    return Method(CLASSICAL_ROWS[key], run)


def stnkit_method(model: str | None, refine: bool = True) -> Method | None:
    """The stnkit aligner, or None (with a printed note) when it is not available."""
    try:
        from stnkit import Aligner
    except ImportError as exc:
        print(f"note: skipping stnkit: `from stnkit import Aligner` failed ({exc})")
        return None
    source = "pretrained" if model in (None, "pretrained") else model
    try:
        aligner = Aligner.pretrained() if source == "pretrained" else Aligner.pretrained(source)
    except Exception as exc:  # noqa: BLE001 - any failure to load means "skip this row" unless asked for
        if model is not None:
            raise SystemExit(f"align.py: cannot load --model {model}: {exc}") from None
        print(f"note: skipping stnkit: no pretrained aligner ({type(exc).__name__}: {exc})")
        return None
    if getattr(aligner, "family", None) == "tps":
        print("note: skipping stnkit: a TPS aligner has no matrix to score with MACE")
        return None
    name = Path(source).name if source != "pretrained" else "pretrained"

    def run(input_image: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, bool]:
        matrix = aligner.align(input_image, support, refine=refine).matrix
        if matrix is None:
            return np.eye(3), False
        if hasattr(matrix, "detach"):
            matrix = matrix.detach().cpu().numpy()
        return np.asarray(matrix, dtype=np.float64), True

    label = f"stnkit aligner ({name}) + refinement (default)" if refine else f"stnkit aligner ({name}), network only"
    return Method(label, run)


def evaluate(method: Method, pairs: list[HomographyPair]) -> dict[str, float]:
    method.run(pairs[0].input, pairs[0].support)  # warm-up: first calls build detectors, caches
    matrices, times, fallbacks = [], [], 0
    for pair in pairs:
        start = time.perf_counter()
        matrix, ok = method.run(pair.input, pair.support)
        times.append(time.perf_counter() - start)
        matrices.append(matrix)
        fallbacks += not ok
    truth = np.stack([pair.support_pix_from_input_pix for pair in pairs])
    errors = mace(np.stack(matrices), truth, PATCH)
    summary = summarise(errors, times)
    summary["fallbacks"] = fallbacks
    return summary


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def format_number(value: float, digits: int = 2) -> str:
    return "inf" if np.isinf(value) else f"{value:.{digits}f}"


def render(rows: list[tuple[str, str, dict]], args: argparse.Namespace, command: str, threads: int, notes: list[str]) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Alignment benchmark: HomographyNet protocol on held-out photos",
        "",
        f"- Date: {now}",
        f"- Machine: {cpu_model()}, {os.cpu_count()} logical cores; OpenCV and torch set to {threads} thread(s)",
        f"- Software: Python {platform.python_version()}, OpenCV {cv2.__version__}, NumPy {np.__version__}, torch {torch.__version__}",
        f"- Command: `{command}`",
        f"- Pairs: {args.pairs} per setting (seed {args.seed}) from the {len(builtin_photos('heldout'))} held-out "
        "built-in photos, greyscale, resized to 320x240, 128x128 patches, corners moved by up to rho px",
        "- MACE: mean over the 4 patch corners of the distance between their images under the predicted and "
        "the true homography, in pixels. Failures fall back to the identity and are scored as such.",
        "- ms/pair: mean wall time per pair after one warm-up call.",
    ]
    lines += [f"- Note: {note}" for note in notes]
    lines += [
        "",
        "| method | rho | mean MACE (px) | median MACE (px) | % > 10 px | ms/pair | fallbacks |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, setting, s in rows:
        lines.append(
            f"| {label} | {setting} | {format_number(s['mean'])} | {format_number(s['median'])} | "
            f"{100 * s['share_above']:.1f} | {format_number(s['ms_per_pair'], 1)} | {s['fallbacks']}/{s['n']} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=200, help="pairs per setting (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair lists (default 0)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/align.md"), help="markdown file to write")
    parser.add_argument("--model", default=None, help="stnkit aligner checkpoint, or 'pretrained' (the default when available)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="OpenCV/torch threads (default: all cores)")
    parser.add_argument("--methods", default=",".join(CLASSICAL_ROWS) + ",stnkit",
                        help="comma-separated subset of: " + ", ".join(CLASSICAL_ROWS) + ", stnkit")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be >= 1, got {args.pairs}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(args.methods) - set(CLASSICAL_ROWS) - {"stnkit"})
    if unknown:
        parser.error(f"unknown --methods {unknown}; expected some of {list(CLASSICAL_ROWS) + ['stnkit']}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/align.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    cv2.setNumThreads(args.threads)
    torch.set_num_threads(args.threads)

    methods = [classical_method(key) for key in CLASSICAL_ROWS if key in args.methods]
    notes = []
    if "stnkit" in args.methods:
        for refine in (False, True):
            aligner = stnkit_method(args.model, refine)
            if aligner is None:
                notes.append("stnkit aligner row skipped: no aligner was available (see the script's output).")
                break
            methods.append(aligner)

    images = builtin_photos("heldout")
    rows = []
    for setting, rho, affine_only in SETTINGS:
        pairs = make_benchmark_pairs(images, args.pairs, rho=rho, seed=args.seed, affine_only=affine_only)
        for method in methods:
            start = time.perf_counter()
            summary = evaluate(method, pairs)
            rows.append((method.label, setting, summary))
            print(
                f"rho={setting:<12} {method.label:<48} mean {format_number(summary['mean']):>7}  "
                f"median {format_number(summary['median']):>6}  >10px {100 * summary['share_above']:5.1f}%  "
                f"{format_number(summary['ms_per_pair'], 1):>6} ms/pair  ({time.perf_counter() - start:.1f} s)",
                flush=True,
            )

    report = render(rows, args, command, args.threads, notes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
