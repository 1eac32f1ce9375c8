"""Checkpoints as single ``.safetensors`` files (never pickle).

Layout of a checkpoint file:

* tensors ``model/<state_dict key>``: the model weights and buffers;
* tensors ``optim/...``, ``sched/...``, ``trainer/...``: the tensors found inside
  the optimizer state, the scheduler state and the trainer state;
* metadata (string -> string):

  ``format``          ``"stnkit-checkpoint"``
  ``format_version``  ``"1"``
  ``config``          JSON of the model config (see :mod:`stnkit.models.registry`)
  ``optimizer``, ``scheduler``, ``trainer_state``
                      JSON of the non-tensor structure of those states, where each
                      tensor is replaced by ``{"__tensor__": "<tensor name>"}``
  ``stnkit_version``, ``torch_version``, ``created`` (UTC, ISO 8601)
  ``sha256``          checksum over every tensor (name, dtype, shape, bytes, in
                      sorted name order) and every other metadata entry, so any
                      altered byte is detected on load.

Files are written atomically (temp file in the same folder, fsync, rename, fsync
of the folder), so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import importlib.resources
import json
import os
import random
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stnkit.models.registry import build_model, model_config

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "shipped_models",
    "capture_rng_state",
    "restore_rng_state",
    "FORMAT",
    "FORMAT_VERSION",
]

FORMAT = "stnkit-checkpoint"
FORMAT_VERSION = 1

# A safetensors header larger than this is not a plausible checkpoint header.
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_STATE_PREFIXES = {"optimizer": "optim", "scheduler": "sched", "trainer_state": "trainer"}


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, as returned by :func:`load_checkpoint`.

    Attributes
    ----------
    config : dict
        The model config; ``build_model(config)`` rebuilds the architecture.
    model_state : dict of str to Tensor
        The model's ``state_dict()``.
    optimizer_state : dict or None
        The optimizer's ``state_dict()``, ready for ``optimizer.load_state_dict``.
    scheduler_state : dict or None
        The learning-rate scheduler's ``state_dict()``.
    trainer_state : dict or None
        Whatever the trainer saved (epoch, step, best metrics, RNG states...).
    metadata : dict of str to str
        The raw safetensors metadata (format, versions, creation time, checksum).
    path : Path or None
        The file it was read from.
    """

    config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    trainer_state: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    config: Mapping[str, Any] | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    trainer_state: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` (and optionally optimizer, scheduler and trainer state) to one file.

    Parameters
    ----------
    path : str or PathLike
        Destination, conventionally ending in ``.safetensors``. Missing parent
        folders are created.
    model : nn.Module
        The model whose ``state_dict()`` is saved.
    config : mapping, optional
        The model config; defaults to the one :func:`~stnkit.models.build_model`
        stored on ``model``.
    optimizer : torch.optim.Optimizer, optional
        Saved with its full state so training continues bit-identically.
    scheduler : object with ``state_dict()``, optional
        A learning-rate scheduler.
    trainer_state : mapping, optional
        Extra state of a training loop: numbers, strings, lists, dicts, tuples,
        bytes and tensors (e.g. from :func:`capture_rng_state`).
    overwrite : bool
        If False and ``path`` exists, raise :class:`FileExistsError`.

    Returns
    -------
    Path
        The path written.

    Examples
    --------
    >>> import tempfile, torch
    >>> from stnkit.models.registry import register_model
    >>> @register_model("doc-ckpt-linear")
    ... def _build(n: int = 3):
    ...     return torch.nn.Linear(n, 2)
    >>> model = build_model({"kind": "doc-ckpt-linear"})
    >>> folder = tempfile.mkdtemp()
    >>> path = save_checkpoint(f"{folder}/m.safetensors", model)
    >>> load_checkpoint(path).config
    {'kind': 'doc-ckpt-linear', 'n': 3}
    """
    path = Path(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite=True to replace it)")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a checkpoint file path")
    config = model_config(model) if config is None else dict(config)
    if not isinstance(config.get("kind"), str):
        raise ValueError(f"model config needs a string 'kind' entry, got {config!r}")

    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"model state entry {name!r} is a {type(value).__name__}, not a tensor")
        tensors[f"model/{name}"] = _cpu_copy(value)

    import stnkit  # the top-level package only, for its version

    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": _json_dumps(config, "model config"),
        "stnkit_version": stnkit.__version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    states = {
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "trainer_state": dict(trainer_state) if trainer_state is not None else None,
    }
    for key, state in states.items():
        if state is not None:
            packed = _pack(state, _STATE_PREFIXES[key], tensors)
            metadata[key] = _json_dumps(packed, key)
    metadata["sha256"] = _checksum(tensors, metadata)

    from safetensors.torch import save as safetensors_bytes

    _write_atomically(path, safetensors_bytes(tensors, metadata=metadata))
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str or PathLike
        The ``.safetensors`` checkpoint file.
    map_location : str or torch.device
        Device to put the tensors on.

    Returns
    -------
    Checkpoint

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is truncated, not a safetensors file, not a stnkit
        checkpoint, of a newer format, or fails its checksum. The message names
        the file and the problem.

    Examples
    --------
    >>> ckpt = load_checkpoint(path)  # doctest: +SKIP
    >>> model = build_model(ckpt.config); model.load_state_dict(ckpt.model_state)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a checkpoint file")
    data = path.read_bytes()
    metadata = _read_metadata(path, data)

    from safetensors import SafetensorError
    from safetensors.torch import load as safetensors_load

    try:
        tensors = safetensors_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: corrupted safetensors data ({exc})") from None
    if metadata.get("sha256") != _checksum(tensors, metadata):
        raise ValueError(f"{path}: checksum mismatch: the file was altered or corrupted")

    try:
        config = json.loads(metadata["config"])
        states = {key: json.loads(metadata[key]) if key in metadata else None for key in _STATE_PREFIXES}
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: broken checkpoint metadata ({exc})") from None

    device = torch.device(map_location)
    tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
    model_state = {name[len("model/") :]: tensor for name, tensor in tensors.items() if name.startswith("model/")}
    unpacked = {key: _unpack(state, tensors) if state is not None else None for key, state in states.items()}
    return Checkpoint(
        config=config,
        model_state=model_state,
        optimizer_state=unpacked["optimizer"],
        scheduler_state=unpacked["scheduler"],
        trainer_state=unpacked["trainer_state"],
        metadata=metadata,
        path=path,
    )


def load_model(path_or_name: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Build a model from a checkpoint file or a shipped model's name, in eval mode.

    Parameters
    ----------
    path_or_name : str or PathLike
        A checkpoint path, or the name of a model shipped in
        ``stnkit/assets/models/<name>.safetensors`` (see :func:`shipped_models`).
    map_location : str or torch.device
        Device to put the model on.

    Returns
    -------
    nn.Module
        The model with its weights loaded (strictly), in eval mode, with its
        config as ``model.stnkit_config``. It is float64 if every floating
        tensor in the checkpoint is, float32 otherwise.

    Raises
    ------
    FileNotFoundError
        If there is no such file and no shipped model of that name (the message
        lists the shipped names).
    ValueError
        If the checkpoint is invalid or its weights do not fit its config.

    Examples
    --------
    >>> model = load_model("mnist-rts")  # doctest: +SKIP
    >>> model = load_model("runs/rts/checkpoints/best.safetensors", map_location="cuda")  # doctest: +SKIP
    """
    candidate = Path(path_or_name)
    if candidate.exists():
        return _model_from_checkpoint(load_checkpoint(candidate), map_location)
    name = str(path_or_name)
    looks_like_name = isinstance(path_or_name, str) and "/" not in name and os.sep not in name
    if looks_like_name and name in shipped_models():
        resource = importlib.resources.files("stnkit").joinpath("assets", "models", f"{name}.safetensors")
        with importlib.resources.as_file(resource) as file:
            return _model_from_checkpoint(load_checkpoint(file), map_location)
    available = ", ".join(shipped_models()) or "(none)"
    raise FileNotFoundError(f"{name}: no such checkpoint file and no shipped model of that name; shipped models: {available}")


def shipped_models() -> list[str]:
    """Return the names of the models shipped in ``stnkit/assets/models``, sorted.

    Examples
    --------
    >>> isinstance(shipped_models(), list)
    True
    """
    folder = importlib.resources.files("stnkit").joinpath("assets", "models")
    if not folder.is_dir():
        return []
    suffix = ".safetensors"
    return sorted(entry.name[: -len(suffix)] for entry in folder.iterdir() if entry.name.endswith(suffix))


def capture_rng_state() -> dict[str, Any]:
    """Return the states of Python's, NumPy's (if installed) and torch's global RNGs.

    The result can be passed as (part of) ``trainer_state`` to
    :func:`save_checkpoint` and restored with :func:`restore_rng_state`.

    Examples
    --------
    >>> state = capture_rng_state()
    >>> a = torch.rand(1); restore_rng_state(state); bool(torch.rand(1) == a)
    True
    """
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the core
        np = None
    if np is not None:
        name, key, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"name": name, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the global RNG states captured by :func:`capture_rng_state`.

    Examples
    --------
    >>> restore_rng_state(capture_rng_state())
    """
    python = state["python"]
    # JSON turns the inner tuple into a list; random.setstate needs tuples.
    random.setstate((python[0], tuple(python[1]), python[2]))
    torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "numpy" in state:
        import numpy as np

        numpy_state = state["numpy"]
        key = np.asarray(numpy_state["key"], dtype=np.uint32)
        np.random.set_state((numpy_state["name"], key, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in state["cuda"]])


# --- internals --------------------------------------------------------------


def _model_from_checkpoint(checkpoint: Checkpoint, map_location: str | torch.device) -> nn.Module:
    model = build_model(checkpoint.config)
    # Models are built in float32. Weights saved all in float64 (a float64 model, or an average of
    # float64 checkpoints) stay float64 instead of being rounded on load; half-precision weights
    # still load into float32, where every CPU kernel exists.
    float_dtypes = {t.dtype for t in checkpoint.model_state.values() if t.is_floating_point()}
    if float_dtypes == {torch.float64}:
        model = model.double()
    try:
        model.load_state_dict(checkpoint.model_state, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first_line[1:3]) or first_line[0]
        raise ValueError(f"{checkpoint.path}: weights do not fit the model config: {detail}") from None
    return model.to(map_location).eval()


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    # clone: safetensors refuses tensors that share storage (tied weights, views).
    return tensor.detach().to("cpu").contiguous().clone()


def _json_dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from None


def _pack(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Turn ``value`` into JSON-able data, moving every tensor into ``tensors``.

    JSON lacks tuples, non-string keys and bytes, so those are tagged:
    ``{"__tensor__": name}``, ``{"__tuple__": [...]}``, ``{"__dict__": [[k, v], ...]}``
    and ``{"__bytes__": base64}``; :func:`_unpack` reverses this exactly.
    """
    if isinstance(value, torch.Tensor):
        if name in tensors:
            raise ValueError(f"two state entries map to the tensor name {name!r}")
        tensors[name] = _cpu_copy(value)
        return {"__tensor__": name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(value)).decode("ascii")}
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return _pack(value.tolist(), name, tensors)
    if isinstance(value, tuple):
        return {"__tuple__": [_pack(item, f"{name}/{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_pack(item, f"{name}/{i}", tensors) for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(key, str) for key in value):
            return {key: _pack(item, f"{name}/{key}", tensors) for key, item in value.items()}
        # Optimizer states are keyed by parameter index (int).
        return {"__dict__": [[_pack(key, name, tensors), _pack(item, f"{name}/{key}", tensors)] for key, item in value.items()]}
    raise TypeError(f"cannot store {type(value).__name__} at {name!r} in a checkpoint")


def _unpack(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_unpack(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        return tensors[value["__tensor__"]]
    if set(value) == {"__tuple__"}:
        return tuple(_unpack(item, tensors) for item in value["__tuple__"])
    if set(value) == {"__dict__"}:
        return {_unpack(key, tensors): _unpack(item, tensors) for key, item in value["__dict__"]}
    if set(value) == {"__bytes__"}:
        return base64.b64decode(value["__bytes__"])
    return {key: _unpack(item, tensors) for key, item in value.items()}


def _checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 over all tensors (sorted by name) and all metadata except the checksum itself."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
    for key in sorted(metadata):
        if key != "sha256":
            digest.update(f"{key}\0{metadata[key]}\0".encode())
    return digest.hexdigest()


def _read_metadata(path: Path, data: bytes) -> dict[str, str]:
    """Check the safetensors header by hand, to tell truncated, foreign and altered files apart."""
    if len(data) < 8:
        raise ValueError(f"{path}: truncated or not a safetensors file (only {len(data)} bytes)")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > len(data) - 8:
        if data[8:9] == b"{" and header_size <= _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: truncated: the file ends inside its header")
        raise ValueError(f"{path}: not a safetensors file (no valid header)")
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path}: not a safetensors file, or its header is corrupted (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a stnkit checkpoint (a safetensors file without stnkit metadata)")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise ValueError(f"{path}: broken checkpoint metadata (format_version {metadata.get('format_version')!r})") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {version} is newer than this stnkit supports ({FORMAT_VERSION}); upgrade stnkit")
    try:
        data_end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        raise ValueError(f"{path}: corrupted safetensors header (bad tensor entry)") from None
    available = len(data) - 8 - header_size
    if data_end > available:
        raise ValueError(f"{path}: truncated: {available} of {data_end} tensor bytes present")
    return metadata


def _write_atomically(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        # Temporary files are private (0600); give the checkpoint the usual umask permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(handle.name, 0o666 & ~umask)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on Windows.
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
