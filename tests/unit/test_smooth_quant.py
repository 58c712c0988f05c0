"""SmoothQuant's graph rewrite on a small real ONNX graph, run by ONNX Runtime: the outputs
stay what they were, the activation's outlier channel shrinks, a shared input is divided once."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from tuneloop.serving.smooth_quant import smooth

RNG = np.random.default_rng(0)


def _graph(path: str, w1: np.ndarray, w2: np.ndarray) -> None:
    """x feeds two weight MatMuls (as a layer's query and key projections do) and a
    residual Add that must not see the smoothing."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2", "residual")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["y1"]), helper.make_node("MatMul", ["x", "w2"], ["y2"]),
             helper.make_node("Add", ["x", "x"], ["residual"])]
    graph = helper.make_graph(nodes, "g", [x], outputs,
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _run(path: str, x: np.ndarray) -> list[np.ndarray]:
    return onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_smoothing_keeps_the_outputs_and_moves_the_outlier_into_the_weights(tmp_path):
    w1, w2 = RNG.normal(size=(4, 3)).astype(np.float32), RNG.normal(size=(4, 2)).astype(np.float32)
    _graph(str(tmp_path / "fp32.onnx"), w1, w2)
    x = RNG.normal(size=(16, 4)).astype(np.float32)
    x[:, 2] *= 50  # one outlier channel, as after a transformer's LayerNorm
    x[:, 3] = 0  # a channel that never fires keeps its scale
    ranges = {"x": np.abs(x).max(axis=0)}
    assert smooth(str(tmp_path / "fp32.onnx"), str(tmp_path / "smoothed.onnx"), ranges, alpha=0.8) == 2

    before, after = _run(str(tmp_path / "fp32.onnx"), x), _run(str(tmp_path / "smoothed.onnx"), x)
    for b, a in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    model = onnx.load(str(tmp_path / "smoothed.onnx"))
    muls = [n for n in model.graph.node if n.op_type == "Mul"]
    assert len(muls) == 1  # one division for both MatMuls that share the input
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert {n.input[0] for n in matmuls} == {muls[0].output[0]}
    assert next(n for n in model.graph.node if n.op_type == "Add").input[0] == "x"  # the residual: untouched
    inverse = next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == muls[0].input[1])
    smoothed_x = x * inverse
    spread = lambda a: np.abs(a).max(axis=0)[:3].max() / np.abs(a).max(axis=0)[:3].min()  # noqa: E731
    assert spread(smoothed_x) < spread(x) / 5  # the outlier channel no longer sets int8's scale alone
    assert inverse[3] == 1.0


def test_inputs_without_calibration_are_left_as_they_were(tmp_path):
    w1, w2 = RNG.normal(size=(4, 3)).astype(np.float32), RNG.normal(size=(4, 2)).astype(np.float32)
    _graph(str(tmp_path / "fp32.onnx"), w1, w2)
    assert smooth(str(tmp_path / "fp32.onnx"), str(tmp_path / "same.onnx"), {"other": np.ones(4)}, alpha=0.8) == 0
    assert not [n for n in onnx.load(str(tmp_path / "same.onnx")).graph.node if n.op_type == "Mul"]


def test_a_weight_shared_by_matmuls_of_two_inputs_is_scaled_once_for_each(tmp_path):
    """ALBERT shares one layer's weights: both smoothed copies took one name, and ONNX
    Runtime kept the last, so the first MatMul ran on weights scaled for the other input."""
    w = RNG.normal(size=(4, 4)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["y"])]
    graph = helper.make_graph(nodes, "shared", [x], [y], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "fp32.onnx"))
    inputs = RNG.normal(size=(16, 4)).astype(np.float32)
    inputs[:, 1] *= 40
    hidden = np.maximum(inputs @ w, 0)
    ranges = {"x": np.abs(inputs).max(axis=0), "r": np.abs(hidden).max(axis=0)}
    assert smooth(str(tmp_path / "fp32.onnx"), str(tmp_path / "smoothed.onnx"), ranges, alpha=0.8) == 2
    names = [i.name for i in onnx.load(str(tmp_path / "smoothed.onnx")).graph.initializer]
    assert len(names) == len(set(names))
    np.testing.assert_allclose(_run(str(tmp_path / "smoothed.onnx"), inputs)[0],
                               _run(str(tmp_path / "fp32.onnx"), inputs)[0], rtol=1e-4, atol=1e-3)
