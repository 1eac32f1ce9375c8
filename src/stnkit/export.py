"""Export trained models to ONNX and check them against PyTorch with onnxruntime.

What gets exported
------------------
* ST classifiers (kind ``"classifier"``): ``images (N, C, H, W) -> logits (N, classes)``,
  the transformer included (its sampler becomes one ONNX ``GridSample``).
* Aligners (kind ``"aligner"``): ``input, support (N, 1, h, w) -> theta (N, P),
  aligned (N, 1, h, w)`` at the aligner's net size ``(h, w)``; ``aligned`` is
  the input resampled into the support frame. Resize full-resolution images to
  the net size first (bilinear with antialiasing, as :meth:`Aligner.align` does).

The batch dimension is dynamic; the image size is fixed at the model's input size.

Every family of the library exports with plain ONNX operators: matrix grids
are broadcast multiply-adds (no ``affine_grid_generator``), corner-parametrised
homographies use a closed-form 4-point solution (no ``linalg.solve``), and the
thin-plate spline's system is solved once and exported as a constant matrix.

Convention
----------
The exported graph computes exactly what the PyTorch module computes in eval
mode: same inputs (float32 in ``[0, 1]``), same backward-map ``theta`` in
normalised coordinates. :func:`export_onnx` refuses to write a file whose
onnxruntime outputs differ from PyTorch by ``atol`` or more on random smooth images.

Examples
--------
>>> from stnkit.models import classifier
>>> model = classifier("st-cnn", "affine", (42, 42))
>>> report = export_onnx(model, "/tmp/st-cnn.onnx", overwrite=True)  # doctest: +SKIP
>>> report.max_abs_diff < 1e-4  # doctest: +SKIP
True
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

__all__ = ["ExportReport", "export_onnx", "export_model", "verify_onnx", "exportable", "MIN_OPSET", "DEFAULT_OPSET"]

#: ONNX ``GridSample`` appeared in opset 16.
MIN_OPSET = 16
#: The lowest opset torch's ONNX exporter emits natively; lower ones go through a version converter.
DEFAULT_OPSET = 18

# aten operators that ONNX exporters cannot lower (or lower only in recent opsets).
_FORBIDDEN_ATEN = ("affine_grid", "linalg", "_solve", "inverse")


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how it was checked.

    Attributes
    ----------
    path : str
        The ONNX file.
    opset : int
        Its default-domain opset.
    kind : str
        ``"classifier"``, ``"aligner"`` or ``"module"``.
    inputs, outputs : dict of str to list
        Names and shapes (``"N"`` marks the dynamic batch dimension).
    max_abs_diff : float or None
        Largest ``|onnxruntime - torch|`` over all outputs on random smooth images
        (``None`` when not verified).
    verified_batch_sizes : list of int
        Batch sizes the check ran at (differ from the export batch, to show the batch is dynamic).
    """

    path: str
    opset: int
    kind: str
    inputs: dict[str, list[Any]] = field(default_factory=dict)
    outputs: dict[str, list[Any]] = field(default_factory=dict)
    max_abs_diff: float | None = None
    verified_batch_sizes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)


class _AlignerGraph(nn.Module):
    """An aligner as an export graph: ``(input, support) -> (theta, aligned)`` at the net size."""

    def __init__(self, aligner: nn.Module) -> None:
        super().__init__()
        self.aligner = aligner

    def forward(self, input: Tensor, support: Tensor) -> tuple[Tensor, Tensor]:
        theta = self.aligner(input, support)
        return theta, self.aligner.warp(input, theta)


def exportable(model: nn.Module, input_shape: Sequence[int] | None = None) -> tuple[nn.Module, tuple[Tensor, ...], list[str], list[str], str]:
    """The module to trace, example inputs, input/output names and the kind of ``model``.

    Parameters
    ----------
    model : nn.Module
        A model built by the registry (classifier or aligner), or any module
        when ``input_shape`` is given.
    input_shape : sequence of int, optional
        ``(C, H, W)`` of the single input of a plain module; classifiers and
        aligners read theirs from their config.

    Returns
    -------
    tuple
        ``(graph_module, example_inputs, input_names, output_names, kind)``;
        ``graph_module`` is an eval-mode deep copy, so ``model`` is left untouched.

    Examples
    --------
    >>> from stnkit.models import classifier
    >>> graph, inputs, names, outputs, kind = exportable(classifier("st-cnn", "tps", (28, 28)))
    >>> kind, names, outputs, tuple(inputs[0].shape)
    ('classifier', ['images'], ['logits'], (2, 1, 28, 28))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = getattr(model, "stnkit_config", {}) or {}
    kind = config.get("kind")
    generator = torch.Generator().manual_seed(0)
    if kind == "aligner":
        height, width = model.size
        graph: nn.Module = _AlignerGraph(copy.deepcopy(model))
        inputs = tuple(torch.rand(2, 1, height, width, generator=generator) for _ in range(2))
        names, outputs = ["input", "support"], ["theta", "aligned"]
    elif kind == "classifier" and input_shape is None:
        height, width = config.get("in_size", (42, 42))
        channels = config.get("in_channels", 1)
        graph = copy.deepcopy(model)
        inputs = (torch.rand(2, channels, height, width, generator=generator),)
        names, outputs = ["images"], ["logits"]
    else:
        if input_shape is None:
            raise ValueError("input_shape=(C, H, W) is needed for a module that is not an stnkit classifier or aligner")
        shape = tuple(int(v) for v in input_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) of positive sizes, got {tuple(input_shape)!r}")
        graph = copy.deepcopy(model)
        inputs = (torch.rand(2, *shape, generator=generator),)
        names, outputs, kind = ["input"], ["output"], "module"
    graph = graph.cpu().float().eval()
    # One real forward pass fills the per-size caches (the TPS operator) with real
    # tensors, so tracing reads them as constants instead of re-solving the system.
    with torch.no_grad():
        graph(*inputs)
    return graph, inputs, names, outputs, kind


def _check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an integer, got {opset!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (ONNX GridSample needs it), got {opset}")
    return opset


def _import_onnx_tools() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            f"ONNX export needs onnx, onnxscript and onnxruntime ({exc.name} is missing): pip install 'stnkit[export]'"
        ) from None
    return onnx, onnxruntime


def _check_no_forbidden_ops(program: Any) -> None:
    """Fail when the traced graph still holds an operator exporters cannot lower."""
    exported = getattr(program, "exported_program", None)
    if exported is None:
        return
    for node in exported.graph.nodes:
        if node.op == "call_function":
            name = str(node.target)
            if any(bad in name for bad in _FORBIDDEN_ATEN):
                raise ValueError(f"the traced graph holds {name}, which does not export portably; please report this")


def export_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    input_shape: Sequence[int] | None = None,
) -> ExportReport:
    """Write ``model`` to ``path`` as ONNX with a dynamic batch dimension, without checking it.

    See :func:`export_onnx` (which also verifies the file) for the parameters.
    """
    onnx, _ = _import_onnx_tools()
    opset = _check_opset(opset)
    graph, inputs, names, outputs, kind = exportable(model, input_shape)
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic_shapes = tuple({0: batch} for _ in inputs)
    path = Path(path)
    # "torchvision is not installed. Skipping torchvision::nms" and the like: noise for these models.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # SpatialTransformer keeps last_theta for inspection; it is not part of the graph.
            warnings.filterwarnings("ignore", message=".*was assigned during export.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
            program = torch.onnx.export(
                graph,
                inputs,
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=outputs,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                verbose=False,
            )
    finally:
        registration_log.setLevel(level)
    _check_no_forbidden_ops(program)
    proto = onnx.load(str(path))
    foreign = sorted({f"{node.domain}::{node.op_type}" for node in proto.graph.node if node.domain not in ("", "ai.onnx")})
    if foreign:
        raise ValueError(f"the exported graph uses non-standard operators {foreign}")
    written_opset = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), opset)
    if written_opset != opset:
        raise ValueError(
            f"the exporter could not convert this model to opset {opset} (it produced opset {written_opset}); "
            f"use opset {written_opset} (--opset {written_opset})"
        )

    def shapes(values: Any) -> dict[str, list[Any]]:
        out = {}
        for value in values:
            dims = value.type.tensor_type.shape.dim
            out[value.name] = ["N" if i == 0 else (d.dim_value if d.HasField("dim_value") else d.dim_param) for i, d in enumerate(dims)]
        return out

    return ExportReport(str(path), int(written_opset), kind, shapes(proto.graph.input), shapes(proto.graph.output))


@torch.no_grad()
def verify_onnx(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    batch_sizes: Sequence[int] = (1, 3),
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    smooth: bool = True,
) -> float:
    """Run the ONNX file with onnxruntime and PyTorch on the same random inputs; return the max abs difference.

    Parameters
    ----------
    path : str or PathLike
        The ONNX file.
    model : nn.Module
        The PyTorch model it was exported from.
    batch_sizes : sequence of int
        Batch sizes to check (the file must accept each).
    input_shape : sequence of int, optional
        ``(C, H, W)`` for a plain module (as in :func:`exportable`).
    seed : int
        Seeds the random inputs.
    smooth : bool
        Random *smooth* images (uniform noise at 1/8 of the size, upsampled
        bilinearly; values in ``[0, 1]``) rather than white noise. Resampling
        white noise turns float32 rounding in ``theta`` (~1e-6) into pixel
        differences of ~1e-4 that say nothing about the export; image-like
        inputs measure the graph.

    Returns
    -------
    float
        ``max |onnxruntime - torch|`` over every output element and batch size.
    """
    _, onnxruntime = _import_onnx_tools()
    graph, examples, names, _, _ = exportable(model, input_shape)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1  # checking is small; leave the cores to training jobs
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batch_sizes:
        inputs = tuple(_random_images(batch, example.shape[1:], generator, smooth) for example in examples)
        expected = graph(*inputs)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        got = session.run(None, {name: value.numpy() for name, value in zip(names, inputs)})
        for reference, actual in zip(expected, got):
            if tuple(reference.shape) != tuple(actual.shape):
                raise ValueError(f"{path}: output shape {tuple(actual.shape)} differs from PyTorch's {tuple(reference.shape)}")
            worst = max(worst, float((reference.float() - torch.from_numpy(actual).float()).abs().max()))
    return worst


def _random_images(batch: int, shape: Sequence[int], generator: torch.Generator, smooth: bool) -> Tensor:
    """Random ``(batch, *shape)`` images in ``[0, 1]``: white noise, or noise at 1/8 size upsampled bilinearly."""
    if not smooth:
        return torch.rand(batch, *shape, generator=generator)
    channels, height, width = shape
    coarse = torch.rand(batch, channels, max(2, height // 8), max(2, width // 8), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def export_onnx(
    model: nn.Module | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_OPSET,
    overwrite: bool = False,
    verify: bool = True,
    atol: float = 1e-4,
    input_shape: Sequence[int] | None = None,
) -> ExportReport:
    """Export a model (or a checkpoint, or a shipped model's name) to ONNX and check it with onnxruntime.

    Parameters
    ----------
    model : nn.Module, str or PathLike
        A module, a checkpoint path or a shipped model's name (``"mnist-rts"``...).
    path : str or PathLike
        Where to write the ``.onnx`` file.
    opset : int, default 18
        ONNX opset, at least 16 (``GridSample``). The exporter works in 18 and
        converts down for 16 and 17, which some graphs (the aligner's) do not survive.
    overwrite : bool
        Replace an existing file.
    verify : bool
        Compare onnxruntime with PyTorch on random smooth images at batch sizes
        1 and 3 (the export traces batch 2, so this also checks the dynamic
        batch); see :func:`verify_onnx`.
    atol : float
        Largest accepted absolute difference; a larger one raises and writes nothing.
    input_shape : sequence of int, optional
        ``(C, H, W)`` of a plain module's input.

    Returns
    -------
    ExportReport

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is false.
    ValueError
        On a bad opset, an unexportable graph or a failed check.
    ImportError
        If onnx, onnxscript or onnxruntime is missing.

    Convention: inputs float32 images in ``[0, 1]``, batch first; the graph
    computes the eval-mode forward pass (see the module docstring).

    Examples
    --------
    >>> report = export_onnx("mnist-rts", "mnist-rts.onnx")  # doctest: +SKIP
    >>> report.inputs  # doctest: +SKIP
    {'images': ['N', 1, 42, 42]}
    """
    _import_onnx_tools()
    opset = _check_opset(opset)
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"{path}: the output file must end in .onnx")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists; pass overwrite=True (--overwrite) to replace it")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a file name")
    if not isinstance(model, nn.Module):
        from stnkit.models.checkpoint import load_model

        model = load_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written next to the target and renamed: a failed export or check leaves nothing behind.
    handle, temporary = tempfile.mkstemp(suffix=".onnx", prefix=f".{path.stem}-", dir=path.parent)
    os.close(handle)
    try:
        report = export_model(model, temporary, opset=opset, input_shape=input_shape)
        if verify:
            report.verified_batch_sizes = [1, 3]
            report.max_abs_diff = verify_onnx(temporary, model, batch_sizes=report.verified_batch_sizes, input_shape=input_shape)
            if not report.max_abs_diff < atol:
                raise ValueError(
                    f"onnxruntime differs from PyTorch by {report.max_abs_diff:.3g} (> atol {atol:g}); nothing written"
                )
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    report.path = str(path)
    return report
