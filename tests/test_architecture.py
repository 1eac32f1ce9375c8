"""The package's layering, checked on the source: lower layers never import higher ones,
and the core (transforms, sampling, localisation, modules) imports with torch alone."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "stnkit"
# Bottom to top; a module may import from its own layer and the ones before it.
LAYERS = ("transforms", "sampling", "localisation", "modules", "models", "data", "training", "evaluation", "cli")
CORE = LAYERS[:4]


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(absolute module name, line)`` for every import statement in the file."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # for a module and for a package's __init__ alike: the folder holding the file
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                found.append((".".join(base + ([node.module] if node.module else [])), node.lineno))
            else:
                found.append((node.module or "", node.lineno))
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "stnkit" and len(parts) > 1 and parts[1] in LAYERS else None


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_layer_folder_exists():
    assert all((PACKAGE / name).is_dir() for name in LAYERS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_import_reaches_up_a_layer(path):
    own = _layer("stnkit." + path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", "."))
    if own is None:  # top-level modules (stnkit/__init__.py, export.py) sit above the layers
        return
    upward = [
        f"line {line}: {module}"
        for module, line in _imports(path)
        if _layer(module) is not None and LAYERS.index(_layer(module)) > LAYERS.index(own)
    ]
    assert not upward, f"{path.relative_to(PACKAGE)} ({own}) imports from higher layers: {upward}"


@pytest.mark.parametrize("path", [p for p in SOURCES if _layer("stnkit." + p.relative_to(PACKAGE).parts[0]) in CORE],
                         ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_core_imports_only_torch_at_module_level(path):
    """Optional libraries (NumPy, OpenCV, Triton) are allowed only inside a guarded import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded = {id(node) for t in ast.walk(tree) if isinstance(t, ast.Try) for node in ast.walk(t)}
    unguarded = []
    for node in tree.body:  # module level only: imports inside functions run on use
        if id(node) in guarded or not isinstance(node, (ast.Import, ast.ImportFrom)) or getattr(node, "level", 0):
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in ("torch", "__future__", "stnkit"):
                unguarded.append(f"line {node.lineno}: {name}")
    assert not unguarded, f"{path.relative_to(PACKAGE)} imports non-core libraries unguarded: {unguarded}"


def test_core_works_with_torch_alone():
    """Import the package and run a transformer forward and backward with every optional library hidden."""
    script = textwrap.dedent(
        """
        import importlib.abc, sys, warnings
        HIDDEN = {"numpy", "cv2", "PIL", "matplotlib", "safetensors", "click", "tqdm", "skimage", "triton", "kornia"}

        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in HIDDEN:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Hide())
        warnings.simplefilter("ignore")  # torch warns once that NumPy is missing
        import torch
        import stnkit
        from stnkit.localisation import conv_localisation

        st = stnkit.SpatialTransformer(conv_localisation(1, (28, 28), "affine"), "affine")
        x = torch.rand(2, 1, 28, 28, requires_grad=True)
        st(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        tps = stnkit.warp(x, stnkit.get_transform("tps").identity(2), "tps")
        assert tps.shape == x.shape
        from stnkit.sampling import warp_image
        try:
            warp_image(torch.rand(8, 8), torch.eye(3))
        except ImportError as exc:
            assert "NumPy" in str(exc), exc
        else:
            raise AssertionError("warp_image ran without NumPy")
        print("OK", sorted({m.split(".")[0] for m in sys.modules} & HIDDEN))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "OK []"
