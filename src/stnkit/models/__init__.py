"""Models built from the core modules, the model registry and checkpoints (safetensors + JSON, never pickle)."""

from __future__ import annotations

from .averaging import Ensemble, average_checkpoints
from .checkpoint import Checkpoint, load_checkpoint, load_model, save_checkpoint, shipped_models
from .classifiers import MODEL_NAMES, STClassifier, build_classifier, classifier, count_parameters
from .registry import build_model, model_config, model_kinds, register_model, resolve_config

__all__ = [
    "average_checkpoints",
    "Ensemble",
    "Checkpoint",
    "load_checkpoint",
    "load_model",
    "save_checkpoint",
    "shipped_models",
    "MODEL_NAMES",
    "STClassifier",
    "build_classifier",
    "classifier",
    "count_parameters",
    "build_model",
    "model_config",
    "model_kinds",
    "register_model",
    "resolve_config",
    "load",
    "pretrained",
    "Aligner",
]


def load(path, map_location="cpu"):
    """A ready ``nn.Module`` (eval mode) from a checkpoint path or a shipped model's name.

    Examples
    --------
    >>> model = load("runs/mnist-rts/checkpoints/best.safetensors")  # doctest: +SKIP
    """
    return load_model(path, map_location=map_location)


def pretrained(name: str = "mnist-rts", map_location="cpu"):
    """A model shipped inside stnkit, by name (see :func:`shipped_models`).

    ``"mnist-rts"``: the ST-CNN (affine) trained on RTS-distorted MNIST; takes
    float images in [0, 1] of shape ``(N, 1, 42, 42)`` and returns logits over the 10 digits.

    Examples
    --------
    >>> net = pretrained("mnist-rts")  # doctest: +SKIP
    >>> net(torch.rand(1, 1, 42, 42)).argmax(1)  # doctest: +SKIP
    """
    return load_model(name, map_location=map_location)


def __getattr__(name: str):
    # The aligner pulls in OpenCV; import it only when asked for.
    if name == "Aligner":
        from .aligner import Aligner

        return Aligner
    raise AttributeError(f"module 'stnkit.models' has no attribute {name!r}")


# The STN variants of Finnveden, Jansson & Lindeberg (ICPR 2020); see stnkit.models.invariance_models.
from .invariance_models import INVARIANCE_VARIANTS, InvarianceClassifier, build_invariance_model, invariance_model  # noqa: E402

__all__ += ["INVARIANCE_VARIANTS", "InvarianceClassifier", "build_invariance_model", "invariance_model"]
