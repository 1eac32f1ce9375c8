"""The ``metrics.csv`` log of a training run: one row per evaluation.

Columns (see :data:`METRICS_COLUMNS`): ``step`` (optimizer steps so far),
``epoch`` (0-based epoch the row was logged in), ``train_loss`` and
``train_acc`` (averaged over the steps since the previous row), ``test_error``
and ``val_error`` (fractions; ``val_error`` empty without validation data),
``lr`` (base learning rate), ``images_per_s`` (training throughput since the
previous row), ``time`` (seconds since the run started, summed over
resumed sessions), ``skipped_steps`` (steps skipped so far because the loss
was not finite) and ``ema_test_error`` (test error of the weights' moving
average; empty unless the run keeps one) and ``consistency_loss`` (the
transformer's consistency loss averaged like ``train_loss``; empty unless the
run trains with one, see :mod:`stnkit.training.consistency`). ``train_loss`` is
the loss minimised: with a consistency loss, its weighted term is included. Each row is flushed as soon as
it is written, so the file is useful while training is still running.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["METRICS_COLUMNS", "MetricsLog", "read_metrics"]

METRICS_COLUMNS: tuple[str, ...] = (
    "step",
    "epoch",
    "train_loss",
    "train_acc",
    "test_error",
    "val_error",
    "lr",
    "images_per_s",
    "time",
    "skipped_steps",
    "ema_test_error",
    "consistency_loss",
)
_INTEGER_COLUMNS = {"step", "epoch", "skipped_steps"}


class MetricsLog:
    """Append-only CSV writer for :data:`METRICS_COLUMNS`.

    Parameters
    ----------
    path : str or PathLike
        The CSV file; created with a header line if missing.
    keep_until_step : int, optional
        When continuing a run, drop existing rows with ``step`` greater than
        this (they were logged after the checkpoint being resumed, and will be
        logged again).

    Examples
    --------
    >>> import tempfile
    >>> log = MetricsLog(tempfile.mkdtemp() + "/metrics.csv")
    >>> log.append({"step": 10, "epoch": 0, "train_loss": 0.5, "test_error": 0.1})
    >>> read_metrics(log.path)[0]["test_error"]
    0.1
    """

    def __init__(self, path: str | os.PathLike[str], *, keep_until_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = read_metrics(self.path) if self.path.exists() else []
        if keep_until_step is not None:
            rows = [row for row in rows if row["step"] <= keep_until_step]
        if not self.path.exists() or keep_until_step is not None or _header(self.path) != list(METRICS_COLUMNS):
            # Rewrite via a temp file so a crash here cannot lose the old rows.
            temp = self.path.with_name(f".{self.path.name}.tmp")
            with temp.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=METRICS_COLUMNS)
                writer.writeheader()
                writer.writerows(_formatted(row) for row in rows)
            os.replace(temp, self.path)

    def append(self, row: Mapping[str, Any]) -> None:
        """Append one row; missing columns are left empty, unknown ones raise ``ValueError``."""
        unknown = set(row) - set(METRICS_COLUMNS)
        if unknown:
            raise ValueError(f"unknown metrics column(s) {sorted(unknown)}; columns are {list(METRICS_COLUMNS)}")
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, fieldnames=METRICS_COLUMNS).writerow(_formatted(row))
            handle.flush()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, float | int | None]]:
    """Read ``metrics.csv`` into a list of dicts (numbers parsed, empty cells as ``None``).

    Examples
    --------
    >>> rows = read_metrics("runs/rts/metrics.csv")  # doctest: +SKIP
    >>> [row["test_error"] for row in rows]  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such metrics file")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path}: not a metrics.csv file (no 'step' column)")
        return [{key: _parsed(key, value) for key, value in row.items() if key is not None} for row in reader]


def _header(path: Path) -> list[str]:
    # A file written before a column was added gets the new header (its rows keep their values).
    with path.open(newline="") as handle:
        return next(csv.reader(handle), [])


def _formatted(row: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in row.items():
        if value is None:
            out[key] = ""
        elif isinstance(value, float):
            # repr keeps every digit, so reading the file back is exact.
            out[key] = repr(value) if math.isfinite(value) else str(value)
        else:
            out[key] = str(value)
    return out


def _parsed(key: str, value: str | None) -> float | int | None:
    if value is None or value == "":
        return None
    return int(value) if key in _INTEGER_COLUMNS else float(value)
