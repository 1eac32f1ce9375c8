"""A registry of model builders, so a model can be rebuilt from a plain config dict.

A *builder* is a function ``builder(**kwargs) -> nn.Module`` registered under a
*kind* name. A *config* is a JSON-serialisable dict ``{"kind": <name>, **kwargs}``.
:func:`build_model` looks the kind up, calls the builder with the remaining keys
and stores the config on the module (attribute ``stnkit_config``), which is all a
checkpoint needs to rebuild the architecture later.

Builders shipped with stnkit live in submodules of :mod:`stnkit.models`; the
registry imports those submodules the first time a kind is not found, so
``build_model`` works even when only this module was imported.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

__all__ = ["register_model", "build_model", "resolve_config", "model_kinds", "model_config", "CONFIG_ATTRIBUTE"]

#: Name of the module attribute that holds the config a model was built from.
CONFIG_ATTRIBUTE = "stnkit_config"

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_BUILTINS_IMPORTED = False


def register_model(kind: str) -> Callable[[Builder], Builder]:
    """Register a builder function under ``kind`` (use as a decorator).

    Parameters
    ----------
    kind : str
        The name stored in configs as ``config["kind"]``; must be unique.

    Returns
    -------
    callable
        A decorator that registers the builder and returns it unchanged.

    Examples
    --------
    >>> from torch import nn
    >>> @register_model("doc-linear")
    ... def build_linear(in_features: int = 4, out_features: int = 2) -> nn.Module:
    ...     return nn.Linear(in_features, out_features)
    >>> build_model({"kind": "doc-linear", "out_features": 3}).out_features
    3
    """
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"model kind must be a non-empty string, got {kind!r}")

    def decorator(builder: Builder) -> Builder:
        if not callable(builder):
            raise TypeError(f"register_model({kind!r}) must decorate a function, got {type(builder).__name__}")
        previous = _BUILDERS.get(kind)
        # Re-registering the same function (a module imported twice, e.g. by
        # importlib.reload) is harmless; a different function under the same
        # name would silently change what old checkpoints load as.
        if previous is not None and _qualified_name(previous) != _qualified_name(builder):
            raise ValueError(
                f"model kind {kind!r} is already registered by {_qualified_name(previous)}; "
                f"pick another name for {_qualified_name(builder)}"
            )
        _BUILDERS[kind] = builder
        return builder

    return decorator


def model_kinds() -> list[str]:
    """Return the registered model kinds, sorted.

    Examples
    --------
    >>> from torch import nn
    >>> @register_model("doc-linear")
    ... def build_linear(in_features: int = 4, out_features: int = 2) -> nn.Module:
    ...     return nn.Linear(in_features, out_features)
    >>> "doc-linear" in model_kinds()
    True
    """
    _import_builtin_builders()
    return sorted(_BUILDERS)


def build_model(config: Mapping[str, Any]) -> nn.Module:
    """Build a model from ``config``; the full config is stored on it as ``stnkit_config``.

    Parameters
    ----------
    config : mapping
        ``{"kind": <registered kind>, **builder_kwargs}``; must be JSON-serialisable
        so that it can be written into a checkpoint.

    Returns
    -------
    nn.Module
        The freshly built (randomly initialised) model. Its ``stnkit_config`` is
        ``resolve_config(config)``: the builder's defaults are filled in, so a
        checkpoint keeps its architecture even if a default changes later.

    Raises
    ------
    ValueError
        If the kind is unknown (the message lists the known kinds) or the config
        is not JSON-serialisable.
    TypeError
        If ``config`` is not a mapping or its keys do not fit the builder.

    Examples
    --------
    >>> from torch import nn
    >>> @register_model("doc-linear")
    ... def build_linear(in_features: int = 4, out_features: int = 2) -> nn.Module:
    ...     return nn.Linear(in_features, out_features)
    >>> model = build_model({"kind": "doc-linear", "in_features": 8})
    >>> model.stnkit_config
    {'kind': 'doc-linear', 'in_features': 8, 'out_features': 2}
    """
    stored = resolve_config(config)
    kind = stored["kind"]
    model = _BUILDERS[kind](**{key: value for key, value in stored.items() if key != "kind"})
    if not isinstance(model, nn.Module):
        raise TypeError(f"builder for model kind {kind!r} returned {type(model).__name__}, not an nn.Module")
    setattr(model, CONFIG_ATTRIBUTE, stored)
    return model


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``config`` against its builder and return it complete, as stored in checkpoints.

    The builder's (JSON-serialisable) defaults are filled in and the values are
    normalised as JSON reads them back (tuples become lists), so two configs
    that build the same model compare equal.

    Raises
    ------
    ValueError, TypeError
        As :func:`build_model`.

    Examples
    --------
    >>> from torch import nn
    >>> @register_model("doc-linear")
    ... def build_linear(in_features: int = 4, out_features: int = 2) -> nn.Module:
    ...     return nn.Linear(in_features, out_features)
    >>> resolve_config({"kind": "doc-linear"})
    {'kind': 'doc-linear', 'in_features': 4, 'out_features': 2}
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"model config must be a dict, got {type(config).__name__}")
    kind = config.get("kind")
    if not isinstance(kind, str):
        raise ValueError(f"model config needs a string 'kind' entry, got {dict(config)!r}")
    if kind not in _BUILDERS:
        _import_builtin_builders()
    if kind not in _BUILDERS:
        known = ", ".join(sorted(_BUILDERS)) or "(none)"
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {known}")

    given = _normalised(config)
    signature = inspect.signature(_BUILDERS[kind])
    try:
        # Checked before calling, so that a TypeError raised inside the builder
        # is not mistaken for a bad config.
        signature.bind(**{key: value for key, value in given.items() if key != "kind"})
    except TypeError as exc:
        raise TypeError(f"config for model kind {kind!r} does not fit its builder: {exc}") from None
    complete = {"kind": kind}
    for name, parameter in signature.parameters.items():
        if name in given:
            complete[name] = given[name]
        elif parameter.default is not inspect.Parameter.empty and _is_json(parameter.default):
            complete[name] = parameter.default
    # Extra keys accepted by a **kwargs builder.
    complete.update((key, value) for key, value in given.items() if key not in complete)
    return _normalised(complete)


def model_config(model: nn.Module) -> dict[str, Any]:
    """Return (a copy of) the config ``model`` was built from.

    Raises
    ------
    ValueError
        If the model was not made by :func:`build_model` (it has no stored config).

    Examples
    --------
    >>> from torch import nn
    >>> @register_model("doc-linear")
    ... def build_linear(in_features: int = 4, out_features: int = 2) -> nn.Module:
    ...     return nn.Linear(in_features, out_features)
    >>> model_config(build_model({"kind": "doc-linear"}))["out_features"]
    2
    """
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if not isinstance(config, dict):
        raise ValueError(
            f"{type(model).__name__} has no stored config (it was not made by build_model); pass its config explicitly"
        )
    return copy.deepcopy(config)


def _normalised(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``config`` as it will read back from JSON (tuples become lists)."""
    try:
        return json.loads(json.dumps(dict(config), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model config must be JSON-serialisable (numbers, strings, lists, dicts): {exc}") from None


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _import_builtin_builders() -> None:
    """Import every submodule of :mod:`stnkit.models` once, so their builders register."""
    global _BUILTINS_IMPORTED
    if _BUILTINS_IMPORTED:
        return
    package = importlib.import_module("stnkit.models")
    for info in pkgutil.iter_modules(package.__path__, prefix="stnkit.models."):
        importlib.import_module(info.name)
    # Only now: a failed import is raised again on the next call, not hidden.
    _BUILTINS_IMPORTED = True


def _qualified_name(function: Callable[..., Any]) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"
