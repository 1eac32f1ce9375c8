"""Thin-plate spline (TPS) warps driven by the offsets of a lattice of control points.

Convention
----------
A backward map in normalised coordinates (``-1``/``+1`` at the image edges,
``align_corners=False``): the spline takes an *output* point ``q`` to the
*input* point ``T(q)`` that is sampled there. The control points ``p_k`` lie on
a regular ``gh x gw`` lattice spanning ``[-1, 1]`` in both axes of the output
image, and ``theta`` holds their offsets: ``T(p_k) = p_k + theta_k``.

The spline is ``T(q) = q + a_0 + A q + sum_k w_k U(|q - p_k|)`` with
``U(r) = r^2 log r^2`` (Bookstein, 1989). Since the lattice is fixed, the
coefficients are a fixed linear function of ``theta``: the ``(K+3) x (K+3)``
system is solved once, and the grid for an output size is one matmul.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .base import Size, Transform, _data_checks_enabled, check_size, normalised_pixel_centres

__all__ = ["ThinPlateSpline", "tps_kernel"]

# Per-output-size operators kept per transform instance; a handful covers the
# usual "train at one size, visualise at another" pattern without growing forever.
_MAX_CACHED_SIZES = 8


# --------------------------------------------------------------------- helpers
def check_lattice_size(grid_size: Sequence[int], family: str, minimum: int = 2) -> tuple[int, int]:
    """Validate a ``(rows, columns)`` lattice size with at least ``minimum`` nodes per axis."""
    if isinstance(grid_size, torch.Size):
        grid_size = tuple(grid_size)
    if not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2:
        raise ValueError(f"{family}: grid_size must be a (rows, columns) pair, got {grid_size!r}")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in grid_size):
        raise TypeError(f"{family}: grid_size must hold two integers, got {grid_size!r}")
    if min(grid_size) < minimum:
        raise ValueError(
            f"{family}: grid_size needs at least {minimum} nodes per axis (one on each image edge), got {grid_size!r}"
        )
    return int(grid_size[0]), int(grid_size[1])


def lattice_points(grid_size: Size, *, device=None, dtype=None) -> Tensor:
    """The ``(gh * gw, 2)`` points ``(x, y)`` of a regular lattice spanning ``[-1, 1]^2``, row-major.

    Convention: normalised coordinates, so the first point is the top-left
    image corner ``(-1, -1)`` and the last the bottom-right corner ``(1, 1)``.

    Examples
    --------
    >>> lattice_points((2, 3)).tolist()
    [[-1.0, -1.0], [0.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]
    """
    rows, columns = grid_size
    ys = torch.linspace(-1.0, 1.0, rows, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, columns, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2)


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is active for ``device_type`` (works on torch >= 2.1)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype grids are computed in: float32 for the 16-bit types, else ``dtype`` itself."""
    # Spline kernels (up to ~17 on the unit square) and accumulated offsets lose
    # too much in 16 bits; the sampler promotes the grid to float32 anyway.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Disable autocast on ``device_type`` inside the block, if it is on."""
    if autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def output_dtype(theta: Tensor) -> torch.dtype:
    """Grids come back in float32 under autocast (the sampler's precision) and in ``theta``'s dtype otherwise."""
    return work_dtype(theta.dtype) if autocast_enabled(theta.device.type) else theta.dtype


def tps_kernel(squared_distance: Tensor) -> Tensor:
    """The thin-plate radial basis ``U = r^2 log r^2``, given ``r^2``.

    ``U(0) = 0`` and its gradient there is ``0`` (the limit), never NaN.

    Examples
    --------
    >>> tps_kernel(torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)).tolist()
    [0.0, 0.0, 5.545177444479562]
    """
    positive = squared_distance > 0
    # Two wheres: log(0) = -inf, and its NaN gradient would leak through a single where.
    safe = torch.where(positive, squared_distance, torch.ones_like(squared_distance))
    return torch.where(positive, safe * torch.log(safe), torch.zeros_like(squared_distance))


def _design_rows(points: Tensor, control_points: Tensor) -> Tensor:
    """Rows ``[U(|q - p_1|), ..., U(|q - p_K|), 1, qx, qy]`` for points ``(..., N, 2)`` -> ``(..., N, K + 3)``."""
    difference = points.unsqueeze(-2) - control_points  # (..., N, K, 2)
    kernel = tps_kernel((difference * difference).sum(-1))
    return torch.cat((kernel, torch.ones_like(points[..., :1]), points), dim=-1)


def solve_tps_system(control_points: Tensor, regularisation: float = 0.0) -> Tensor:
    """The ``(K + 3, K)`` matrix taking control-point offsets to spline coefficients.

    Solves ``[[U + lambda I, P], [P^T, 0]] [w; a] = [offsets; 0]`` for the
    identity right-hand side, in float64 whatever the input dtype: the system
    is badly conditioned for large lattices.

    Parameters
    ----------
    control_points : Tensor
        ``(K, 2)`` points, not all on one line.
    regularisation : float
        ``lambda >= 0`` added to the kernel diagonal; ``0`` interpolates exactly.

    Returns
    -------
    Tensor
        ``(K + 3, K)`` float64: the first ``K`` rows give the kernel weights
        ``w``, the last 3 the affine part ``(a_0, a_x, a_y)``.

    Examples
    --------
    >>> solve_tps_system(lattice_points((2, 2))).shape
    torch.Size([7, 4])

    Raises
    ------
    ValueError
        If two control points coincide (with ``regularisation == 0`` the
        spline would have to take two values at one point) or all of them lie
        on one line (the affine part is undetermined).
    """
    points = control_points.to(torch.float64)
    count = points.shape[0]
    # --- degenerate control points: a clear error instead of linalg's "singular matrix".
    if points.dim() != 2 or points.shape[-1] != 2 or count < 3:
        raise ValueError(f"control_points must have shape (K, 2) with K >= 3, got {tuple(control_points.shape)}")
    if regularisation == 0:
        difference = points.unsqueeze(0) - points.unsqueeze(1)
        same = (difference == 0).all(dim=-1) & ~torch.eye(count, dtype=torch.bool, device=points.device)
        if same.any():
            first, second = same.nonzero()[0].tolist()
            raise ValueError(
                f"control points {first} and {second} coincide ({points[first].tolist()}): a thin-plate spline "
                "needs distinct control points (or regularisation > 0)"
            )
    centred = points - points.mean(dim=0)
    if torch.linalg.matrix_rank(centred) < 2:
        raise ValueError("all control points lie on one line: the spline's affine part is undetermined")
    rows = _design_rows(points, points)  # (K, K + 3) = [U, P]
    kernel = rows[:, :count] + regularisation * torch.eye(count, dtype=torch.float64, device=points.device)
    affine = rows[:, count:]
    top = torch.cat((kernel, affine), dim=1)
    bottom = torch.cat((affine.T, torch.zeros(3, 3, dtype=torch.float64, device=points.device)), dim=1)
    system = torch.cat((top, bottom), dim=0)
    rhs = torch.cat((torch.eye(count, dtype=torch.float64), torch.zeros(3, count, dtype=torch.float64)), dim=0)
    return torch.linalg.solve(system, rhs.to(points.device))


# ---------------------------------------------------------------- the family
class ThinPlateSpline(Transform):
    """Thin-plate spline through a ``gh x gw`` lattice of control points: ``2 * gh * gw`` parameters.

    Parameters
    ----------
    grid_size : (int, int)
        Control points per column and per row, ``(gh, gw)``, each at least 2;
        the lattice spans ``[-1, 1]`` in both axes (so its outer points lie on
        the image edges).
    regularisation : float
        ``lambda >= 0`` added to the kernel diagonal. ``0`` interpolates the
        control points exactly; larger values trade exactness for smoothness.

    Convention: backward map in normalised coordinates. ``theta`` ``(B, 2K)``
    holds the offsets ``(dx, dy)`` of the control points, row-major over the
    lattice with ``x`` before ``y`` (``theta.view(B, gh, gw, 2)``): output point
    ``p_k`` samples the input at ``p_k + theta_k``. Identity is all zeros.

    Notes
    -----
    The ``(K+3) x (K+3)`` system is solved once in float64 and kept, cast, per
    device and dtype; the ``(H*W, K)`` matrix taking offsets to the grid is
    kept per output size, device and dtype (the last 8 sizes). The grid is
    then the identity grid plus one matmul. Under autocast it is computed and
    returned in float32.

    Examples
    --------
    >>> tps = ThinPlateSpline(grid_size=(3, 3))
    >>> theta = tps.identity(1, dtype=torch.float64)
    >>> theta[0, 8] = 0.2  # the centre control point (index 4) samples 0.2 to its right
    >>> tps.transform_points(theta, torch.zeros(1, 1, 2, dtype=torch.float64)).round(decimals=6).tolist()
    [[[0.2, 0.0]]]
    >>> tps.grid(theta, (32, 32)).shape
    torch.Size([1, 32, 32, 2])
    """

    name = "thin_plate_spline"

    def __init__(self, grid_size: Sequence[int] = (4, 4), regularisation: float = 0.0) -> None:
        self.grid_size: Size = check_lattice_size(grid_size, type(self).__name__)
        if isinstance(regularisation, bool) or not isinstance(regularisation, (int, float)):
            raise TypeError(f"ThinPlateSpline: regularisation must be a real number, got {regularisation!r}")
        if not math.isfinite(regularisation) or regularisation < 0:
            raise ValueError(f"ThinPlateSpline: regularisation must be finite and >= 0, got {regularisation!r}")
        self.regularisation = float(regularisation)
        self.num_params = 2 * self.grid_size[0] * self.grid_size[1]
        # The one solve, on the CPU and at construction: the system depends on the lattice alone,
        # and a solve first met inside torch.compile would break the graph.
        self._solution_float64: Tensor = solve_tps_system(self.control_points(dtype=torch.float64), self.regularisation)
        self._solutions: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._grid_operators: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()

    @property
    def num_control_points(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def config(self) -> dict:
        return {"name": self.name, "grid_size": list(self.grid_size), "regularisation": self.regularisation}

    def identity(self, batch: int = 1, *, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch, self.num_params, device=device, dtype=dtype)

    def control_points(self, device=None, dtype=None) -> Tensor:
        """The ``(K, 2)`` control points ``(x, y)``, row-major over the lattice.

        Convention: normalised output coordinates, ``(-1, -1)`` first.

        Examples
        --------
        >>> ThinPlateSpline((2, 2)).control_points().tolist()
        [[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]
        """
        return lattice_points(self.grid_size, device=device, dtype=dtype)

    # ------------------------------------------------------------ caches
    def _solution(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The ``(K + 3, K)`` offsets-to-coefficients matrix on ``device`` in ``dtype``."""
        key = (torch.device(device), dtype)
        solution = self._solutions.get(key)
        if solution is None:
            # Solved on the CPU (float64 is not available on every accelerator, e.g. MPS), moved on first use.
            solution = self._solution_float64.to(device=device, dtype=dtype)
            self._solutions[key] = solution
        return solution

    def _grid_operator(self, out_size: Size, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Identity grid ``(H*W, 2)`` and the ``(H*W, K)`` matrix taking offsets to displacements."""
        key = (out_size, torch.device(device), dtype)
        cached = self._grid_operators.get(key)
        if cached is not None:
            self._grid_operators.move_to_end(key)
            return cached
        # Built straight in the target dtype, so the identity grid matches
        # normalised_pixel_centres bit for bit.
        ys, xs = normalised_pixel_centres(out_size, device=device, dtype=dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        base = torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2)
        # The operator itself in float64 where the device has it: kernel values
        # reach ~17 and the solution has large entries of both signs.
        build = torch.float64 if torch.device(device).type != "mps" else torch.float32
        rows = _design_rows(base.to(build), self.control_points(device=device, dtype=build))
        operator = (rows @ self._solution(device, build)).to(dtype)
        self._grid_operators[key] = (base, operator)
        while len(self._grid_operators) > _MAX_CACHED_SIZES:
            self._grid_operators.popitem(last=False)
        return base, operator

    # ---------------------------------------------------------------- maps
    def grid(self, theta: Tensor, out_size: Sequence[int]) -> Tensor:
        """Sampling grid ``(B, H, W, 2)``: the spline evaluated at every output pixel centre.

        Convention: backward map, normalised coordinates, last dim ``(x, y)``.

        Examples
        --------
        >>> tps = ThinPlateSpline((2, 2))
        >>> theta = torch.full((1, 8), 0.5)  # every corner moves by (0.5, 0.5): a translation
        >>> tps.grid(theta, (2, 2))[0, 0, 0].tolist()
        [0.0, 0.0]
        """
        out_size = check_size(out_size)
        theta = self.check_theta(theta)
        dtype = work_dtype(theta.dtype)
        with full_precision(theta.device.type):
            base, operator = self._grid_operator(out_size, theta.device, dtype)
            offsets = theta.to(dtype).reshape(theta.shape[0], self.num_control_points, 2)
            points = base + operator @ offsets  # (B, H*W, 2)
        return points.view(theta.shape[0], out_size[0], out_size[1], 2).to(output_dtype(theta))

    def transform_points(self, theta: Tensor, points: Tensor) -> Tensor:
        """Map output points ``(B, N, 2)`` to the input points ``(B, N, 2)`` they sample.

        Convention: backward map in normalised coordinates; a batch of 1 in
        either argument is broadcast. Differentiable in ``theta`` and ``points``.

        Examples
        --------
        >>> tps = ThinPlateSpline((2, 2))
        >>> tps.transform_points(tps.identity(1), torch.tensor([[[0.25, -0.75]]])).tolist()
        [[[0.25, -0.75]]]
        """
        theta = self.check_theta(theta)
        if not isinstance(points, Tensor) or points.dim() != 3 or points.shape[-1] != 2:
            shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
            raise ValueError(f"ThinPlateSpline: points must have shape (B, N, 2), got {shape}")
        if not points.is_floating_point():
            raise TypeError(f"ThinPlateSpline: points must be floating point, got dtype {points.dtype}")
        _check_batches("transform_points", theta, points)
        promoted = torch.promote_types(theta.dtype, points.dtype)
        dtype = work_dtype(promoted)
        with full_precision(theta.device.type):
            offsets = theta.to(dtype).reshape(theta.shape[0], self.num_control_points, 2)
            coefficients = self._solution(theta.device, dtype) @ offsets  # (B, K + 3, 2)
            points_work = points.to(dtype)
            rows = _design_rows(points_work, self.control_points(device=theta.device, dtype=dtype))
            mapped = points_work + rows @ coefficients
        return mapped if autocast_enabled(theta.device.type) else mapped.to(promoted)

    def compose(self, first: Tensor, second: Tensor) -> Tensor:
        """Offsets of "warp by ``first``, then warp the result by ``second``".

        Convention: the combined backward map is ``T_first(T_second(q))``, so
        that ``warp(warp(x, first), second) ~ warp(x, compose(first, second))``.
        The new offsets are that map at the control points,
        ``c_k = T_first(T_second(p_k)) - p_k`` (``= T_first(p_k + second_k) - p_k``
        when ``regularisation == 0``).

        Notes
        -----
        Exact at the control points; in between, the composite of two splines
        is not a spline, and the result is its spline interpolant. The error
        there is second order in the size of the warps: about 0.03 (normalised
        units) for random offsets of standard deviation 0.05 on a 4x4 lattice,
        a quarter of that at half the size.

        Examples
        --------
        >>> tps = ThinPlateSpline((2, 2))
        >>> shift = torch.full((1, 8), 0.25)
        >>> tps.compose(shift, shift)[0, :2].tolist()
        [0.5, 0.5]
        """
        first, second = self.check_theta(first), self.check_theta(second)
        _check_batches("compose", first, second)
        control = self.control_points(device=first.device, dtype=first.dtype).unsqueeze(0)
        through_second = self.transform_points(second, control)
        composed = self.transform_points(first, through_second) - control
        return composed.reshape(composed.shape[0], self.num_params)

    def inverse(self, theta: Tensor, *, iterations: int = 30) -> Tensor:
        """Offsets of the approximate inverse warp, by fixed-point iteration on the control points.

        Convention: ``compose(theta, inverse(theta))`` is (nearly) the identity:
        the inverse sends ``p_k`` to the point ``z_k`` with ``T(z_k) = p_k``,
        found by iterating ``z <- p_k - (T(z) - z)`` from ``z = p_k - theta_k``.

        Notes
        -----
        Accuracy: the iteration converges when the displacement ``T(q) - q``
        is a contraction, i.e. its Jacobian has norm below 1 (moderate,
        non-folding warps); the error at the control points then shrinks by
        that factor each iteration (to rounding error for random offsets of
        standard deviation 0.1 on a 4x4 lattice). Between control points the
        inverse is the spline through the ``z_k``, so ``T(T_inverse(q)) = q``
        and ``compose(inverse(theta), theta) = 0`` hold only to second order in
        the warp size: within about 0.02 normalised units for offsets of
        standard deviation 0.05 on a 4x4 lattice. A warp that folds has no
        inverse and the iteration need not converge.

        Examples
        --------
        >>> tps = ThinPlateSpline((2, 2))
        >>> tps.inverse(torch.full((1, 8), 0.25))[0, :2].tolist()
        [-0.25, -0.25]
        """
        theta = self.check_theta(theta)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"ThinPlateSpline: iterations must be an integer >= 0, got {iterations!r}")
        control = self.control_points(device=theta.device, dtype=theta.dtype).unsqueeze(0)
        offsets = theta.reshape(theta.shape[0], self.num_control_points, 2)
        source = control - offsets
        for _ in range(iterations):
            source = control - (self.transform_points(theta, source) - source)
        if _data_checks_enabled() and not torch.isfinite(source).all():
            # The iteration diverged (a folding or very large warp): say so rather than return NaN.
            raise ValueError(
                "ThinPlateSpline.inverse: the fixed-point iteration diverged; the warp is too large or folds, "
                "so it has no inverse"
            )
        return (source - control).reshape(theta.shape[0], self.num_params)


def _check_batches(operation: str, a: Tensor, b: Tensor) -> None:
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise ValueError(f"{operation}: batch sizes differ ({a.shape[0]} vs {b.shape[0]}) and neither is 1")
