"""ONNX export (checked with onnxruntime) and torch.compile / torch.export compatibility of the core modules."""

from __future__ import annotations

import json

import pytest
import torch

from stnkit.cli.main import main
from stnkit.localisation import conv_localisation
from stnkit.models.checkpoint import save_checkpoint
from stnkit.models.classifiers import classifier
from stnkit.models.registry import build_model
from stnkit.modules import SpatialTransformer
from stnkit.transforms import get_transform

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from stnkit.export import export_onnx, verify_onnx  # noqa: E402

CORNERS = {"name": "projective", "parametrisation": "corners"}


def _perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Nudge every weight so the transformers predict something other than the identity."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _aligner(family: str) -> torch.nn.Module:
    config = {"kind": "aligner", "transform": family, "size": [40, 40], "channels": [8], "iterations": 2, "hidden": 32}
    return _perturbed(build_model(config))


def _op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize(
    "model_name, family",
    [("st-cnn", "affine"), ("st-cnn", "projective"), ("st-fcn", CORNERS), ("st-fcn", "tps")],
    ids=["st-cnn-affine", "st-cnn-projective", "st-fcn-projective-corners", "st-fcn-tps"],
)
def test_classifier_exports_and_matches_pytorch(tmp_path, model_name, family):
    model = _perturbed(classifier(model_name, family, (28, 28)))
    report = export_onnx(model, tmp_path / "model.onnx")
    assert report.max_abs_diff < 1e-4, report
    assert report.inputs == {"images": ["N", 1, 28, 28]} and report.outputs == {"logits": ["N", 10]}
    ops = _op_types(tmp_path / "model.onnx")
    assert "GridSample" in ops and "AffineGrid" not in ops
    # The dynamic batch: a batch the export never saw.
    assert verify_onnx(tmp_path / "model.onnx", model, batch_sizes=(7,)) < 1e-4


@pytest.mark.parametrize("family", ["affine", "projective", "tps"])
def test_aligner_exports_theta_and_aligned_image(tmp_path, family):
    model = _aligner(family)
    report = export_onnx(model, tmp_path / "aligner.onnx")
    assert report.max_abs_diff < 1e-4, report
    num_params = model.transform.num_params
    assert report.outputs == {"theta": ["N", num_params], "aligned": ["N", 1, 40, 40]}
    assert "GridSample" in _op_types(tmp_path / "aligner.onnx")


def test_opset_17_for_classifiers_and_opset_checks(tmp_path):
    model = _perturbed(classifier("st-cnn", "affine", (28, 28)))
    report = export_onnx(model, tmp_path / "m17.onnx", opset=17)
    assert report.opset == 17 and report.max_abs_diff < 1e-4
    with pytest.raises(ValueError, match="opset must be >= 16"):
        export_onnx(model, tmp_path / "m15.onnx", opset=15)
    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx(model, tmp_path / "m17.onnx", opset=17)
    with pytest.raises(ValueError, match=r"\.onnx"):
        export_onnx(model, tmp_path / "model.bin")


def test_plain_module_needs_an_input_shape(tmp_path):
    with pytest.raises(ValueError, match="input_shape"):
        export_onnx(torch.nn.Conv2d(1, 2, 3), tmp_path / "conv.onnx")
    report = export_onnx(torch.nn.Conv2d(1, 2, 3), tmp_path / "conv.onnx", input_shape=(1, 8, 8))
    assert report.kind == "module" and report.outputs == {"output": ["N", 2, 6, 6]}


def test_cli_exports_a_checkpoint(tmp_path, capsys):
    model = _perturbed(classifier("st-cnn", "tps", (28, 28)))
    checkpoint = save_checkpoint(tmp_path / "model.safetensors", model)
    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "-o", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["max_abs_diff"] < 1e-4 and summary["opset"] == 18 and out.is_file()
    # An existing file is kept unless --overwrite.
    assert main(["export", str(checkpoint), "-o", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "-o", str(out), "--overwrite", "--no-verify"]) == 0
    assert json.loads(capsys.readouterr().out)["max_abs_diff"] is None
    # Bad input: one line on stderr.
    assert main(["export", str(tmp_path / "missing.safetensors"), "-o", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "no such checkpoint" in err and err.count("\n") == 1
    assert main(["export", str(checkpoint), "-o", str(out), "--overwrite", "--opset", "12"]) == 1
    assert "opset must be >= 16" in capsys.readouterr().err


# --- torch.compile / torch.export ------------------------------------------------


@pytest.mark.parametrize("family", ["affine", "projective", CORNERS, "tps", "similarity"], ids=str)
def test_spatial_transformer_compiles_without_graph_breaks(family):
    torch._dynamo.reset()
    transform = get_transform({"name": "tps", "grid_size": [3, 3]} if family == "tps" else family)
    st = SpatialTransformer(conv_localisation(1, (28, 28), transform), out_size=(20, 20), iterations=2)
    st = _perturbed(st)
    x = torch.rand(3, 1, 28, 28)
    # No eager pass first: cold caches (the thin-plate spline's grid operator) must not break the graph.
    explanation = torch._dynamo.explain(st)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(st, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), st(x))


def test_aligner_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = _aligner("projective")
    x, support = torch.rand(2, 1, 40, 40), torch.rand(2, 1, 40, 40)
    model(x, support)
    explanation = torch._dynamo.explain(model)(x, support)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_torch_export_with_dynamic_batch():
    model = _perturbed(classifier("st-cnn", CORNERS, (28, 28)))
    model(torch.rand(2, 1, 28, 28))
    batch = torch.export.Dim("batch", min=1, max=1024)
    with pytest.warns(UserWarning, match="last_theta"):
        program = torch.export.export(model, (torch.rand(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("linalg" in name or "affine_grid" in name for name in targets), targets
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(program.module()(x), model(x))


# --- shipped models -----------------------------------------------------------------


def _shipped(name: str) -> str:
    from stnkit.models.checkpoint import shipped_models

    if name not in shipped_models():
        pytest.skip(f"{name} is not shipped in this build")
    return name


def test_cli_exports_the_shipped_classifier_by_name(tmp_path, capsys):
    out = tmp_path / "mnist-rts.onnx"
    assert main(["export", _shipped("mnist-rts"), "--format", "onnx", "-o", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["inputs"] == {"images": ["N", 1, 42, 42]} and summary["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_shipped_aligner_exports(tmp_path):
    report = export_onnx(_shipped("aligner-projective"), tmp_path / "aligner.onnx")
    assert report.outputs["theta"] == ["N", 8] and report.max_abs_diff < 1e-4
