"""Align photos of a product to a template: predict each photo's homography and resample it into the template frame.

Photos here are simulated so the true warp is known: the template (a built-in
photo, or your own image) is seen through a random homography with a change
of brightness and contrast, as a hand-held shot of a flat label or package
would be. Each photo is aligned with :meth:`stnkit.Aligner.align`, and the
corner error (pixels between where the template's corners land and where they
should) is printed for the aligner and for "no alignment".

The aligner is the shipped ``aligner-projective`` when installed, a checkpoint
given with ``--model``, or else one trained here for ``--train-steps`` steps on
the built-in training photos (the template comes from the held-out ones).

Convention: ``AlignmentResult.matrix`` is ``support_pix_from_input_pix``
(pixel centres at integers): ``cv2.warpPerspective(photo, matrix, (W, H))``
gives the aligned photo.

Usage::

    python examples/align_product_photos.py --quick                      # seconds, untrained-ish aligner
    python examples/align_product_photos.py --model aligner-projective --photos 8 --out aligned.png
    python examples/align_product_photos.py --template my_label.png --model runs/aligner/checkpoints/best.safetensors
"""

from __future__ import annotations

import argparse
import tempfile

import cv2
import numpy as np

from stnkit.data.images import builtin_photos, load_image
from stnkit.data.pairs import homography_from_corners, patch_corners, transform_points
from stnkit.models.aligner import SHIPPED_ALIGNER, Aligner
from stnkit.models.checkpoint import shipped_models


def simulate_photo(template: np.ndarray, rng: np.random.Generator, rho: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """A photo of ``template`` through a random homography; returns ``(photo, photo_pix_from_template_pix)``.

    Each template corner moves by up to ``rho`` times the image size; brightness
    and contrast change by up to 20%.
    """
    height, width = template.shape[:2]
    corners = patch_corners((height, width)).astype(np.float64)
    moved = corners + rng.uniform(-rho, rho, size=(4, 2)) * np.array([width, height])
    matrix = homography_from_corners(corners, moved)  # template pixels -> photo pixels
    photo = cv2.warpPerspective(template, matrix, (width, height), borderMode=cv2.BORDER_REFLECT)
    gain, bias = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    return np.clip(photo.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8), matrix


def corner_error(template_shape: tuple[int, ...], truth: np.ndarray, estimate: np.ndarray) -> float:
    """Mean distance (pixels, template frame) between the corners mapped by ``truth`` and by ``estimate``.

    Both matrices map photo pixels to template pixels.
    """
    corners = patch_corners(template_shape[:2]).astype(np.float64)
    in_photo = transform_points(np.linalg.inv(truth), corners)  # where the template's corners are in the photo
    return float(np.linalg.norm(transform_points(estimate, in_photo) - corners, axis=1).mean())


def get_aligner(model: str | None, train_steps: int, quick: bool) -> Aligner:
    """The aligner to use: ``model`` if given, the shipped one if installed, else a briefly trained one."""
    if model is not None:
        return Aligner.pretrained(model)
    if SHIPPED_ALIGNER in shipped_models():
        return Aligner.pretrained(SHIPPED_ALIGNER)
    from stnkit.training.aligner_training import train_aligner

    print(f"no shipped {SHIPPED_ALIGNER!r}: training one for {train_steps} steps on the built-in photos")
    size, channels = ((64, 64), (8, 16)) if quick else ((128, 128), (16, 32, 64, 96))
    with tempfile.TemporaryDirectory() as run:
        return train_aligner(builtin_photos("train"), "projective", run, steps=train_steps, batch_size=8 if quick else 32,
                             size=size, channels=channels, eval_every=max(train_steps, 1), val_pairs=8, progress=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny settings: runs in seconds (the alignment will be poor).")
    parser.add_argument("--template", help="Template image file (default: a held-out built-in photo).")
    parser.add_argument("--model", help=f"Aligner checkpoint or shipped name (default: {SHIPPED_ALIGNER} if installed).")
    parser.add_argument("--photos", type=int, default=6, help="Number of simulated photos.")
    parser.add_argument("--train-steps", type=int, default=1500, help="Steps when an aligner has to be trained here.")
    parser.add_argument("--out", help="Write a contact sheet (template | photo | aligned, one row per photo) here.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.photos, args.train_steps = min(args.photos, 2), 3

    template = load_image(args.template) if args.template else builtin_photos("heldout")[0][1]
    template = cv2.resize(template, (256, 256), interpolation=cv2.INTER_AREA)
    aligner = get_aligner(args.model, args.train_steps, args.quick)
    rng = np.random.default_rng(args.seed)

    rows, errors, baseline = [], [], []
    for index in range(args.photos):
        photo, photo_from_template = simulate_photo(template, rng)
        result = aligner.align(photo, template)
        truth = np.linalg.inv(photo_from_template)  # photo pixels -> template pixels
        errors.append(corner_error(template.shape, truth, result.matrix))
        baseline.append(corner_error(template.shape, truth, np.eye(3)))
        print(f"photo {index}: corner error {errors[-1]:6.2f} px (unaligned {baseline[-1]:6.2f} px)")
        rows.append(np.hstack([template, photo, result.image]))
    print(f"mean corner error {np.mean(errors):.2f} px; unaligned {np.mean(baseline):.2f} px")
    if args.out:
        sheet = np.vstack(rows)
        cv2.imwrite(args.out, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR) if sheet.ndim == 3 else sheet)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
