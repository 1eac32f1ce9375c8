"""``stnkit align``: align an image (or every image of a folder) to a support image.

Convention: the matrix written by ``--matrix-out`` is
``support_pix_from_input_pix`` (float64, pixel centres at integers), so
``cv2.warpPerspective(input, M, (W_support, H_support))`` reproduces the output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import cv2
import numpy as np

from .main import CLIError

_CONVENTION = (
    "support_pix_from_input_pix: maps an input pixel (x, y, 1), pixel centres at integers, to the support pixel "
    "showing the same content; cv2.warpPerspective(input, M, (W_support, H_support)) aligns the input"
)


def _check_output(path: Path, overwrite: bool, what: str) -> None:
    """Refuse an output in a missing folder, a folder in place of a file, or an existing file without --overwrite."""
    if not path.parent.is_dir():
        raise CLIError(f"{what} {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise CLIError(f"{what} {path}: is a folder, expected a file path")
    if path.exists() and not overwrite:
        raise CLIError(f"{what} {path}: already exists (pass --overwrite to replace it)")


def _check_writable_format(path: Path, what: str) -> None:
    if not cv2.haveImageWriter(str(path)):
        raise CLIError(f"{what} {path}: unsupported image format {path.suffix or '(no extension)'!r}; use .png, .jpg, .tif ...")


def _write_image(path: Path, image: np.ndarray) -> None:
    """Write an RGB(A) or greyscale uint8 image (OpenCV wants BGR)."""
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGRA)
    try:
        ok = cv2.imwrite(str(path), image)
    except cv2.error as exc:
        raise CLIError(f"{path}: could not write the image ({exc.msg.strip() if hasattr(exc, 'msg') else exc})") from None
    if not ok:
        raise CLIError(f"{path}: could not write the image")


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2RGB)
    return image


def overlay_picture(support: np.ndarray, input: np.ndarray, aligned: np.ndarray, matrix: np.ndarray | None,
                    height: int = 256, tile: int = 8) -> np.ndarray:
    """One RGB picture: support, input, aligned input, and a checkerboard of aligned over support.

    Each panel is scaled to ``height`` rows (aspect kept). In the checkerboard,
    tiles alternate between the aligned input and the support where the
    aligned input has content; elsewhere the support is shown, dimmed.

    Examples
    --------
    >>> a = np.zeros((20, 30), np.uint8)
    >>> overlay_picture(a, a, a, np.eye(3), height=32).shape
    (32, 216, 3)
    """
    support_rgb, input_rgb, aligned_rgb = _rgb(support), _rgb(input), _rgb(aligned)
    h_s, w_s = support.shape[:2]
    if matrix is not None:
        coverage = cv2.warpPerspective(np.ones(input.shape[:2], np.uint8), matrix, (w_s, h_s)) > 0
    else:
        coverage = np.ones((h_s, w_s), bool)
    ys, xs = np.mgrid[0:h_s, 0:w_s]
    cells = max(1, min(h_s, w_s) // tile)
    board = ((ys * cells // min(h_s, w_s)) + (xs * cells // min(h_s, w_s))) % 2 == 0
    checker = (support_rgb * 0.5).astype(np.uint8)
    checker[coverage] = support_rgb[coverage]
    use_aligned = coverage & board
    checker[use_aligned] = aligned_rgb[use_aligned]

    def scaled(panel: np.ndarray) -> np.ndarray:
        width = max(1, round(panel.shape[1] * height / panel.shape[0]))
        return cv2.resize(panel, (width, height), interpolation=cv2.INTER_AREA)

    gap = np.full((height, 8, 3), 255, np.uint8)
    panels = [scaled(p) for p in (support_rgb, input_rgb, aligned_rgb, checker)]
    pieces: list[np.ndarray] = []
    for panel in panels:
        pieces += [panel, gap]
    return np.concatenate(pieces[:-1], axis=1)


def _load_aligner(model: str):
    from stnkit.models.aligner import Aligner

    return Aligner.pretrained(model)


def _align_one(aligner, input_path: Path, support: np.ndarray, support_path: Path, out: Path,
               matrix_out: Path | None, overlay: Path | None, model: str, refine: bool = True) -> dict[str, Any]:
    from stnkit.data.images import load_image

    image = load_image(input_path)
    result = aligner.align(image, support, refine=refine)
    _write_image(out, result.image)
    record = {
        "input": str(input_path), "support": str(support_path), "output": str(out), "model": model,
        "input_size": list(image.shape[:2]), "support_size": list(support.shape[:2]),
        "support_pix_from_input_pix": None if result.matrix is None else result.matrix.tolist(),
        "theta": result.theta.tolist(), "convention": _CONVENTION,
        "refined": result.ncc is not None, "ncc": result.ncc, "refinement_start": result.start,
    }
    if matrix_out is not None:
        matrix_out.write_text(json.dumps(record, indent=2) + "\n")
    if overlay is not None:
        _write_image(overlay, overlay_picture(support, image, result.image, result.matrix))
    return record


@click.command(name="align", context_settings={"show_default": True})
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.argument("support_path", metavar="SUPPORT", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", type=click.Path(path_type=Path), required=True,
              help="Aligned image (or, when INPUT is a folder, the output folder).")
@click.option("--model", default="aligner-projective",
              help="Aligner checkpoint (.safetensors) or the name of a shipped model.")
@click.option("--matrix-out", type=click.Path(path_type=Path), default=None,
              help="JSON with the 3x3 support_pix_from_input_pix matrix (folder mode: one JSON for all images).")
@click.option("--overlay", type=click.Path(path_type=Path), default=None,
              help="PNG with support, input, aligned input and a checkerboard (folder mode: a folder of PNGs).")
@click.option("--refine/--no-refine", default=True,
              help="Polish the network's projective estimate photometrically (NCC, coarse to fine; ~0.1-0.4 s per "
                   "image on a 2-core CPU); --no-refine uses the network alone (~6 ms).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
def command(input_path: Path, support_path: Path, out: Path, model: str, matrix_out: Path | None,
            overlay: Path | None, refine: bool, overwrite: bool) -> None:
    """Align INPUT to SUPPORT: write INPUT resampled into SUPPORT's frame to OUT.

    INPUT and SUPPORT may differ in size and colour. If INPUT is a folder,
    every image in it is aligned to SUPPORT and written to the folder OUT
    under the same name.
    """
    from stnkit.data.images import IMAGE_EXTENSIONS, load_image

    if not input_path.exists():
        raise CLIError(f"{input_path}: no such file or folder")
    folder_mode = input_path.is_dir()
    if folder_mode:
        files = sorted(p for p in input_path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise CLIError(f"{input_path}: no image files found (expected extensions {', '.join(IMAGE_EXTENSIONS)})")
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {out}: is a file; with a folder INPUT, OUT must be a folder")
        if not out.parent.is_dir():
            raise CLIError(f"--out {out}: folder {out.parent} does not exist")
        if overlay is not None and overlay.exists() and not overlay.is_dir():
            raise CLIError(f"--overlay {overlay}: is a file; with a folder INPUT, --overlay must be a folder")
        if overlay is not None and not overlay.parent.is_dir():
            raise CLIError(f"--overlay {overlay}: folder {overlay.parent} does not exist")
        jobs = [(f, out / f.name, None if overlay is None else overlay / f"{f.stem}.png") for f in files]
    else:
        jobs = [(input_path, out, overlay)]
    # Check every output before any work, so a bad path costs nothing.
    for _, target, overlay_target in jobs:
        if folder_mode:
            if target.exists() and not overwrite:
                raise CLIError(f"{target}: already exists (pass --overwrite to replace it)")
            if overlay_target is not None and overlay_target.exists() and not overwrite:
                raise CLIError(f"{overlay_target}: already exists (pass --overwrite to replace it)")
        else:
            _check_output(target, overwrite, "--out")
            if overlay_target is not None:
                _check_output(overlay_target, overwrite, "--overlay")
        _check_writable_format(target, "--out")
    if matrix_out is not None:
        _check_output(matrix_out, overwrite, "--matrix-out")

    support = load_image(support_path)
    aligner = _load_aligner(model)
    if folder_mode:
        out.mkdir(exist_ok=True)
        if overlay is not None:
            overlay.mkdir(exist_ok=True)
    records = []
    for source, target, overlay_target in jobs:
        records.append(_align_one(aligner, source, support, support_path, target, None, overlay_target, model, refine))
        click.echo(f"{source} -> {target}")
    if matrix_out is not None:
        payload: Any = records[0] if not folder_mode else {"convention": _CONVENTION, "images": records}
        matrix_out.write_text(json.dumps(payload, indent=2) + "\n")
