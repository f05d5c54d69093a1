from pathlib import Path

import pytest
import torch

import optimize
from optimize.capture import capture
from optimize.passes import GENERIC_PASSES, PassContext, register_pass, run_passes, unregister_pass
from optimize.passes.base import GraphPass, call_nodes
from optimize.passes.order import PASS_ORDER, Step
from optimize.runtime.config import CompileConfig
from optimize.runtime.errors import AccuracyError, ConfigError
from optimize.sources import load_source

aten = torch.ops.aten


class WithDropoutAndDeadBranch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)
        self.drop = torch.nn.Dropout(0.5)
        self.register_buffer("scale", torch.full((8,), 2.0))

    def forward(self, x):
        _ = self.unused(x)  # computed, never returned
        w = self.fc.weight.t().t()  # a constant expression of weights
        return self.drop(torch.nn.functional.linear(x, w, self.fc.bias)) * (self.scale + 1.0)


def factory():
    torch.manual_seed(0)
    return WithDropoutAndDeadBranch(), {"x": torch.randn(2, 8)}


def graph_of(config: CompileConfig):
    src = load_source(f"{__name__}:factory", config)
    return src, capture(src).module()


def test_generic_passes_remove_dropout_fold_constants_and_dead_code():
    config = CompileConfig(backend="eager", max_batch=4)
    src, gm = graph_of(config)
    assert call_nodes(gm, aten.dropout.default)
    results = {r.name: r for r in run_passes(gm, PassContext(config, src.inputs, "eager"), GENERIC_PASSES)}
    assert results["remove_dropout"].matches["dropout"] == 1
    assert results["fold_constants"].matches["folded"] >= 2, "w.t().t() and scale + 1 are constants"
    assert results["remove_dead_code"].matches["nodes"] >= 1, "the unused linear is removed"
    assert not call_nodes(gm, aten.dropout.default)
    assert len(call_nodes(gm, aten.linear.default)) == 1
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x=x), src.module(x=x))


def test_passes_disabled_in_config_or_unsupported_by_backend_are_reported_as_skipped():
    config = CompileConfig(backend="eager", max_batch=4, passes={"dead_code": False})  # the old name still works
    src, gm = graph_of(config)
    with pytest.warns(FutureWarning, match="'dead_code' is now called 'remove_dead_code'"):
        results = {r.name: r for r in run_passes(gm, PassContext(config, src.inputs, "eager"),
                                                 frozenset({"remove_dropout", "remove_dead_code"}))}
    assert results["remove_dead_code"].skipped == "disabled in config"
    assert results["fold_constants"].skipped == "not supported by backend eager"
    assert results["remove_dropout"].total == 1


def test_unknown_pass_name_is_a_config_error():
    config = CompileConfig(backend="eager", passes={"fuse_everything": True})
    src, gm = graph_of(CompileConfig(backend="eager"))
    with pytest.raises(ConfigError, match="unknown pass"):
        run_passes(gm, PassContext(config, src.inputs, "eager"), GENERIC_PASSES)


class BreakLinear(GraphPass):
    """A deliberately wrong rewrite: the verification mode must catch and name it."""

    name = "break_linear"
    description = "test-only: negates every linear"

    def run(self, gm, ctx):
        nodes = call_nodes(gm, aten.linear.default)
        for node in nodes:
            with gm.graph.inserting_after(node):
                neg = gm.graph.call_function(aten.neg.default, (node,))
            node.replace_all_uses_with(neg, delete_user_cb=lambda user: user is not neg)
        return {"linear": len(nodes)}


def test_verification_mode_names_the_first_pass_that_breaks_accuracy(tmp_path: Path):
    register_pass(BreakLinear)
    try:
        config = CompileConfig(backend="eager", max_batch=4, verify_passes=True)
        src, gm = graph_of(config)
        with pytest.raises(AccuracyError, match="pass break_linear broke accuracy"):
            run_passes(gm, PassContext(config, src.inputs, "eager"), GENERIC_PASSES | {"break_linear"},
                       verifier=lambda g: {"max_abs_error": _error(g, src), "min_cosine": 1.0},
                       tolerance=(1e-4, 0.999))
    finally:
        unregister_pass("break_linear")


def _error(gm, src) -> float:
    x = torch.randn(2, 8)
    return (gm(x=x)["output"] - src.module(x=x)["output"]).abs().max().item()


def test_compile_records_the_pass_report_in_the_manifest(tmp_path: Path):
    engine = optimize.compile(f"{__name__}:factory", tmp_path / "e",
                              CompileConfig(backend="onnxruntime", max_batch=4, verify_passes=True))
    report = {entry["pass"]: entry for entry in engine.manifest.passes}
    assert report["remove_dropout"]["matches"]["dropout"] == 1
    assert report["remove_dropout"]["accuracy"]["max_abs_error"] < 1e-5
    x = torch.randn(3, 8)
    torch.testing.assert_close(engine.run({"x": x})["output"], factory()[0].eval()(x), rtol=1e-5, atol=1e-5)
    # the ONNX stage is a stage of the build, not a step hidden in the backend: its passes are
    # reported like the FX ones, and the export and the passes are timed on their own
    onnx_ran = [e for e in engine.manifest.passes if e["stage"] == "onnx" and not e.get("skipped")]
    assert [e["pass"] for e in onnx_ran][:2] == ["onnx_fold_constants", "onnx_fuse_layer_norm"]
    assert all(e["seconds"] > 0 for e in onnx_ran)
    stages = list(engine.manifest.timings_s)
    assert stages.index("FX passes") < stages.index("ONNX export") < stages.index("ONNX passes") \
        < stages.index("build (onnxruntime)")


def test_every_pass_of_the_order_is_the_class_its_module_names():
    for step in PASS_ORDER:
        cls = step.pass_class()
        package = "optimize.passes." if step.stage == "fx" else "optimize.onnx."
        assert cls.__module__ == package + step.name.removeprefix("onnx_"), "one name: the pass and its module"
    with pytest.raises(TypeError, match="is not the fx pass 'fold_constants'"):
        Step("fold_constants", "fx", "optimize.passes.remove_dropout:RemoveDropout").pass_class()
