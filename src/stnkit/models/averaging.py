"""Average several classifiers: their weights (one model) or their predictions (an ensemble).

Averaging weights, rather than predictions, gives one model that costs what
one model costs at test time. It works when the checkpoints lie in one basin
of the loss: snapshots along one training run (stochastic weight averaging,
Izmailov et al., "Averaging Weights Leads to Wider Optima and Better
Generalization", 2018), or fine-tunes that started from the same weights
(Wortsman et al., "Model soups", 2022). Checkpoints trained from different
random initialisations do not share a basin, and their average is usually
much worse than either. Such models can still be combined by averaging their
predicted class probabilities (:class:`Ensemble`), at the cost of running
every member.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint, _model_from_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["Ensemble", "average_checkpoints"]


def average_checkpoints(
    paths: Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> Path:
    """Write the uniform average of the weights of ``paths`` to ``out_path``.

    Floating-point tensors (weights and float buffers) are averaged in
    float64 and cast back to their dtype; other tensors (integer counters such
    as BatchNorm's ``num_batches_tracked``) must be equal in every checkpoint.
    The result is a plain model checkpoint (no optimizer state); its trainer
    state records the files it was averaged from.

    Parameters
    ----------
    paths : sequence of str or PathLike
        Two or more checkpoint files written by
        :func:`~stnkit.models.save_checkpoint`, all with the same model config.
    out_path : str or PathLike
        The checkpoint to write (atomically).
    overwrite : bool
        Replace ``out_path`` if it exists; otherwise an existing file is an error.

    Returns
    -------
    Path
        The path written.

    Raises
    ------
    ValueError
        Fewer than two checkpoints; a checkpoint whose model config, tensor
        names, shapes or dtypes differ from the first one's (the message names
        both files and the difference); integer tensors that differ.
    FileExistsError
        ``out_path`` exists and ``overwrite`` is False.

    Examples
    --------
    >>> import tempfile, torch
    >>> from stnkit.models import classifier, load_checkpoint, save_checkpoint
    >>> folder = tempfile.mkdtemp()
    >>> paths = []
    >>> for seed in (0, 1):
    ...     _ = torch.manual_seed(seed)
    ...     paths.append(save_checkpoint(f"{folder}/cnn{seed}.safetensors", classifier("cnn", None, (28, 28))))
    >>> soup = average_checkpoints(paths, f"{folder}/soup.safetensors")
    >>> load_checkpoint(soup).trainer_state["averaged_from"] == [str(path) for path in paths]
    True
    """
    paths = [Path(path) for path in paths]
    if len(paths) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {len(paths)}")
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path}: already exists (pass overwrite=True, or --overwrite, to replace it)")
    first = load_checkpoint(paths[0])
    # copy=True: a float64 checkpoint would otherwise share its tensors with the running sums.
    sums = {name: tensor.to(torch.float64, copy=True) for name, tensor in first.model_state.items() if tensor.is_floating_point()}
    for path in paths[1:]:
        other = load_checkpoint(path)
        _check_same_model(first, other)
        for name, tensor in other.model_state.items():
            if tensor.is_floating_point():
                sums[name] += tensor.to(torch.float64)
            elif not torch.equal(tensor, first.model_state[name]):
                raise ValueError(f"{path}: non-float tensor {name!r} differs from {first.path}'s; it cannot be averaged")
    averaged = {
        name: (sums[name] / len(paths)).to(tensor.dtype) if tensor.is_floating_point() else tensor.clone()
        for name, tensor in first.model_state.items()
    }
    model = _model_from_checkpoint(Checkpoint(config=first.config, model_state=averaged, path=first.path), "cpu")
    trainer_state = {"averaged_from": [str(path) for path in paths], "average": "uniform"}
    return save_checkpoint(out_path, model, first.config, trainer_state=trainer_state, overwrite=overwrite)


def _check_same_model(first: Checkpoint, other: Checkpoint) -> None:
    """Raise ``ValueError`` naming both files unless ``other`` has ``first``'s config and tensor layout."""
    if other.config != first.config:
        raise ValueError(f"{other.path}: model config {other.config} differs from {first.path}'s {first.config}; "
                         "only checkpoints of one architecture can be averaged")
    missing = sorted(set(first.model_state) ^ set(other.model_state))
    if missing:
        raise ValueError(f"{other.path}: tensor names differ from {first.path}'s (e.g. {missing[0]!r})")
    for name, tensor in first.model_state.items():
        theirs = other.model_state[name]
        if theirs.shape != tensor.shape or theirs.dtype != tensor.dtype:
            raise ValueError(f"{other.path}: tensor {name!r} is {theirs.dtype} {tuple(theirs.shape)}, "
                             f"{first.path} has {tensor.dtype} {tuple(tensor.shape)}")


class Ensemble(nn.Module):
    """A classifier that averages the class probabilities of several classifiers.

    Unlike :func:`average_checkpoints`, the members need not share a basin,
    an architecture or even an input pipeline beyond the input shape: each
    runs on the same batch and their softmax outputs are averaged. The cost is
    the sum of the members' costs.

    Parameters
    ----------
    members : sequence of nn.Module
        Two or more classifiers; each maps ``(N, C, H, W)`` to logits
        ``(N, classes)`` (or a tuple starting with them), all with the same
        number of classes.

    Returns
    -------
    Tensor
        ``forward`` returns the log of the mean probability, ``(N, classes)``:
        log-probabilities, usable wherever logits are (``argmax``,
        ``cross_entropy``).

    Raises
    ------
    ValueError
        Fewer than two members; members whose outputs differ in shape.
    TypeError
        A member that is not an ``nn.Module``.

    Examples
    --------
    >>> import torch
    >>> from stnkit.models import classifier
    >>> members = [classifier("cnn", None, (28, 28)) for _ in range(2)]
    >>> Ensemble(members).eval()(torch.rand(3, 1, 28, 28)).exp().sum(1)
    tensor([1.0000, 1.0000, 1.0000], grad_fn=<SumBackward1>)
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(members)}")
        for index, member in enumerate(members):
            if not isinstance(member, nn.Module):
                raise TypeError(f"ensemble member {index} must be an nn.Module, got {type(member).__name__}")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probabilities = []
        for index, member in enumerate(self.members):
            output = member(x)
            logits = output[0] if isinstance(output, tuple) else output
            if log_probabilities and logits.shape != log_probabilities[0].shape:
                raise ValueError(f"ensemble member {index} returned logits of shape {tuple(logits.shape)}, "
                                 f"member 0 returned {tuple(log_probabilities[0].shape)}")
            log_probabilities.append(torch.log_softmax(logits, dim=1))
        # log(mean p) computed as logsumexp(log p) - log k: no underflow to log(0).
        return torch.logsumexp(torch.stack(log_probabilities), dim=0) - math.log(len(log_probabilities))
