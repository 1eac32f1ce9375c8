"""The transformer consistency loss (stnkit.training.consistency) and its use in training."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from stnkit.models.classifiers import classifier
from stnkit.modules import SpatialTransformer
from stnkit.sampling import warp
from stnkit.transforms.base import norm_from_pix, normalised_pixel_centres, pix_from_norm
from stnkit.training.consistency import consistency_loss, random_similarity, sampled_consistency_loss
from stnkit.training.metrics_log import METRICS_COLUMNS, MetricsLog, read_metrics
from stnkit.training.trainer import TrainConfig, Trainer

from conftest import run_cli


CORNERS = torch.tensor([[-1.0, 1.0, 1.0, -1.0], [-1.0, -1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)


class ConstantLocaliser(nn.Module):
    """Always the identity transform, whatever the image."""

    def __init__(self, transform: str = "affine") -> None:
        super().__init__()
        self.transform = transform
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.to(x.dtype).expand(len(x), 6)


class CentroidLocaliser(nn.Module):
    """Translation to the image's centre of mass: exactly equivariant to shifts of content away from the border."""

    transform = "translation"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ys, xs = normalised_pixel_centres(tuple(x.shape[-2:]), dtype=x.dtype)
        mass = x.sum(dim=(1, 2, 3))
        cx = (x.sum(dim=(1, 2)) * xs).sum(-1) / mass
        cy = (x.sum(dim=(1, 3)) * ys).sum(-1) / mass
        return torch.stack((cx, cy), dim=1)


class BackwardsLocaliser(CentroidLocaliser):
    """Moves the canonical frame away from the content: as consistent as it is wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -super().forward(x)


def blobs(n: int, size: int = 32, dtype=torch.float64) -> torch.Tensor:
    """Smooth blobs well inside the image, so that small shifts do not reach the border."""
    generator = torch.Generator().manual_seed(5)
    ys, xs = normalised_pixel_centres((size, size), dtype=dtype)
    centres = (torch.rand(n, 2, generator=generator, dtype=dtype) - 0.5) * 0.4
    widths = 0.1 + 0.1 * torch.rand(n, 1, 1, generator=generator, dtype=dtype)
    dy = ys.view(1, -1, 1) - centres[:, 1].view(-1, 1, 1)
    dx = xs.view(1, 1, -1) - centres[:, 0].view(-1, 1, 1)
    return torch.exp(-(dx.square() + 2.0 * dy.square()) / widths.square()).unsqueeze(1)


# --- random_similarity ---------------------------------------------------------


def test_zero_ranges_give_identities():
    assert torch.equal(random_similarity(3, (20, 30), rotation=0.0, scale=0.0, shift=0.0), torch.eye(3).expand(3, 3, 3))


def test_draws_stay_in_their_ranges_and_are_true_rotations_in_pixels():
    size = (20, 30)  # not square: the normalised matrix is not a rotation, its pixel form is
    matrices = random_similarity(500, size, rotation=25.0, scale=0.2, shift=0.15,
                                 generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # fmt: skip
    pixel = pix_from_norm(size) @ matrices @ norm_from_pix(size)
    linear = pixel[:, :2, :2]
    scale = torch.linalg.det(linear).sqrt()
    rotation = linear / scale.view(-1, 1, 1)
    torch.testing.assert_close(rotation @ rotation.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(500, 2, 2))
    angle = torch.rad2deg(torch.atan2(linear[:, 1, 0], linear[:, 0, 0]))
    assert angle.abs().max() <= 25.0 and angle.abs().max() > 20.0
    assert scale.log().abs().max() <= 0.2 + 1e-12 and scale.log().abs().max() > 0.15
    assert matrices[:, :2, 2].abs().max() <= 0.15 and torch.equal(matrices[:, 2], torch.tensor([0.0, 0.0, 1.0]).expand(500, 3))


def test_draws_are_reproducible_with_a_generator():
    draw = lambda: random_similarity(4, (28, 28), rotation=10, scale=0.1, shift=0.1, generator=torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.equal(draw(), draw())


@pytest.mark.parametrize("name", ["rotation", "scale", "shift"])
@pytest.mark.parametrize("value", [-1.0, math.inf, math.nan, True])
def test_bad_ranges_are_refused(name, value):
    ranges = {"rotation": 10.0, "scale": 0.1, "shift": 0.1, name: value}
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0"):
        random_similarity(2, (28, 28), **ranges)


# --- consistency_loss ------------------------------------------------------------


def test_a_transformer_that_ignores_the_image_scores_the_similarity_itself():
    # M1 = M2 = identity, so M1^-1 T M2 = T: the loss is T's own mean squared corner displacement.
    transformer = SpatialTransformer(ConstantLocaliser()).double()
    x = torch.rand(6, 1, 16, 16, dtype=torch.float64)
    similarity = random_similarity(6, (16, 16), rotation=30, scale=0.2, shift=0.2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = ((similarity @ CORNERS)[:, :2] - CORNERS[:2]).square().sum(dim=1).mean()
    torch.testing.assert_close(consistency_loss(transformer, x, similarity), expected)


def test_an_equivariant_transformer_scores_zero():
    transformer = SpatialTransformer(CentroidLocaliser())
    x = blobs(8)
    shifts = random_similarity(8, (32, 32), rotation=0.0, scale=0.0, shift=0.1,
                               generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # fmt: skip
    assert consistency_loss(transformer, x, shifts).item() < 1e-12
    # ...and it is not zero for a transformer that follows the content the wrong way.
    backwards = SpatialTransformer(BackwardsLocaliser())
    expected = 4 * shifts[:, :2, 2].square().sum(dim=1).mean()  # every corner moves by twice the shift
    torch.testing.assert_close(consistency_loss(backwards, x, shifts), expected)


class LossOf(nn.Module):
    """consistency_loss as a module, so that torch.func.functional_call can swap its parameters."""

    def __init__(self, transformer: SpatialTransformer) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, x: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        return consistency_loss(self.transformer, x, similarity)


def test_gradcheck_through_the_localisation_net():
    torch.manual_seed(0)
    localiser = nn.Sequential(nn.Flatten(), nn.Linear(64, 6)).double()
    with torch.no_grad():
        localiser[1].weight.mul_(0.05)
        localiser[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))
    module = LossOf(SpatialTransformer(localiser, "affine"))
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    similarity = random_similarity(3, (8, 8), rotation=20, scale=0.1, shift=0.1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def loss_of(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        params = {"transformer.localisation.1.weight": weight, "transformer.localisation.1.bias": bias}
        return torch.func.functional_call(module, params, (x, similarity))

    weight = localiser[1].weight.detach().clone().requires_grad_()
    bias = localiser[1].bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(loss_of, (weight, bias))


def test_bad_input_is_refused():
    x = torch.rand(2, 1, 16, 16)
    similarity = torch.eye(3).expand(2, 3, 3)
    with pytest.raises(TypeError, match="must be a SpatialTransformer"):
        consistency_loss(nn.Identity(), x, similarity)
    tps = classifier("st-cnn", "tps", (28, 28)).transformer
    with pytest.raises(ValueError, match="needs a transform with a matrix.*'thin_plate_spline'"):
        consistency_loss(tps, torch.rand(2, 1, 28, 28), similarity)
    transformer = SpatialTransformer(ConstantLocaliser())
    with pytest.raises(ValueError, match=r"transform_matrix must be \(2, 3, 3\)"):
        consistency_loss(transformer, x, torch.eye(3).expand(3, 3, 3))
    with pytest.raises(ValueError, match=r"x must be a floating \(N, C, H, W\) tensor"):
        consistency_loss(transformer, torch.rand(2, 16, 16), similarity)


def test_the_sampled_loss_is_the_loss_of_a_fresh_random_similarity():
    transformer = SpatialTransformer(BackwardsLocaliser())
    x = blobs(5)
    ranges = dict(rotation=15.0, scale=0.1, shift=0.1)
    similarity = random_similarity(5, (32, 32), **ranges, generator=torch.Generator().manual_seed(7))
    expected = consistency_loss(transformer, x, similarity)
    sampled = sampled_consistency_loss(transformer, x, **ranges, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sampled, expected)
    with pytest.raises(ValueError, match=r"x must be a floating \(N, C, H, W\) tensor, got torch.Size\(\[5, 32, 32\]\)"):
        sampled_consistency_loss(transformer, x[:, 0], **ranges)
    with pytest.raises(ValueError, match="shift must be a finite number >= 0"):
        sampled_consistency_loss(transformer, x, rotation=15.0, scale=0.1, shift=-1.0)


# --- training with it ------------------------------------------------------------


def digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def train(out_dir, model=None, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = classifier("st-cnn", "affine", (28, 28)) if model is None else model
    settings = dict(epochs=2, batch_size=16, optimizer="adam", lr=1e-3, out_dir=out_dir, progress=False, seed=3,
                    consistency_weight=1.0, checkpoint_every=2, eval_every=3)  # fmt: skip
    trainer = Trainer(model, None, lambda epoch: digits(48, epoch), digits(32, 99), TrainConfig(**{**settings, **overrides}))
    trainer.fit()
    return trainer


def test_training_logs_the_consistency_loss_and_resumes_bit_identically(tmp_path):
    full = train(tmp_path / "full")
    rows = read_metrics(tmp_path / "full" / "metrics.csv")
    assert rows and all(row["consistency_loss"] is not None and row["consistency_loss"] >= 0 for row in rows)
    train(tmp_path / "split", max_steps=3)
    resumed = Trainer.resume(tmp_path / "split", lambda epoch: digits(48, epoch), digits(32, 99))
    resumed.fit()
    for (name, value), other in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(value, other), name
    ignore = {"time", "images_per_s"}
    strip = lambda rows: [{k: v for k, v in row.items() if k not in ignore} for row in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "split" / "metrics.csv")) == strip(rows)


def test_the_loss_changes_what_the_localisation_net_learns():
    with_loss = train(None, epochs=1).model.transformer.localisation.parameters()
    without = train(None, epochs=1, consistency_weight=0.0).model.transformer.localisation.parameters()
    assert any(not torch.equal(a, b) for a, b in zip(with_loss, without))


def test_without_the_loss_its_column_stays_empty(tmp_path):
    train(tmp_path, epochs=1, consistency_weight=0.0)
    assert all(row["consistency_loss"] is None for row in read_metrics(tmp_path / "metrics.csv"))


def test_models_it_cannot_train_are_refused():
    with pytest.raises(ValueError, match="needs a model with a spatial transformer in front"):
        train(None, model=classifier("cnn", None, (28, 28)))
    with pytest.raises(ValueError, match="needs a transform with a matrix.*'thin_plate_spline'"):
        train(None, model=classifier("st-cnn", "tps", (28, 28)))
    with pytest.raises(ValueError, match="consistency_weight must be a finite number >= 0"):
        TrainConfig(consistency_weight=-1.0)
    with pytest.raises(ValueError, match="consistency_rotation must be a finite number >= 0"):
        TrainConfig(consistency_rotation=math.nan)


def test_the_cli_trains_with_it_and_refuses_it_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--task", "rts", "--digit-sample", "--epochs", "1", "--train-limit", "64", "--test-limit", "32",
              "--batch-size", "32", "--no-progress", "--out", str(out)]  # fmt: skip
    code, _, err = run_cli(["train", *common, "--consistency", "0.5", "--consistency-rotation", "10"], capsys)
    assert code == 0, err
    assert read_metrics(out / "metrics.csv")[-1]["consistency_loss"] > 0
    code, _, err = run_cli(["train", "--out", str(out), "--resume", "--consistency", "1"], capsys)
    assert code != 0 and "--consistency apply to a new run" in err
    code, _, err = run_cli(["train", *common[:-1], str(tmp_path / "cnn"), "--model", "cnn", "--consistency", "1"], capsys)
    assert code != 0 and "needs a model with a spatial transformer" in err and len(err.strip().splitlines()) == 1


def test_metrics_files_from_before_the_column_get_the_new_header(tmp_path):
    path = tmp_path / "metrics.csv"
    old_columns = [column for column in METRICS_COLUMNS if column != "consistency_loss"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=old_columns)
        writer.writeheader()
        writer.writerow({"step": 5, "epoch": 0, "train_loss": 0.5})
    log = MetricsLog(path)
    log.append({"step": 10, "epoch": 1, "consistency_loss": 0.25})
    rows = read_metrics(path)
    assert [(row["step"], row["train_loss"], row["consistency_loss"]) for row in rows] == [(5, 0.5, None), (10, None, 0.25)]


def test_warp_of_the_similarity_moves_content_as_the_matrix_says():
    # x2(p) = x(T p): a blob at c in x appears where T maps to c, i.e. at T^-1 c.
    x = blobs(1)
    shift = torch.eye(3, dtype=torch.float64).unsqueeze(0)
    shift[0, 0, 2] = 0.125
    moved = warp(x, shift[:, :2, :].reshape(1, 6), "affine")
    centroid = lambda image: CentroidLocaliser()(image)[0]  # noqa: E731
    torch.testing.assert_close(centroid(moved), centroid(x) - torch.tensor([0.125, 0.0], dtype=torch.float64))


def test_under_bfloat16_autocast_the_loss_stays_float32_and_close():
    torch.manual_seed(0)
    transformer = classifier("st-cnn", "affine", (28, 28)).transformer
    x = torch.rand(8, 1, 28, 28)
    similarity = random_similarity(8, (28, 28), rotation=20, scale=0.1, shift=0.1, generator=torch.Generator().manual_seed(6))
    exact = consistency_loss(transformer, x, similarity)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = consistency_loss(transformer, x, similarity)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=0.1, atol=1e-3)
