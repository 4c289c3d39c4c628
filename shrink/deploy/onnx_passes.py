"""ONNX graph passes run on every exported file.

Global pooling: the dynamo exporter lowers ``adaptive_avg_pool2d(x, 1)`` and ``x.mean((2, 3))``
to ``ReduceMean(axes=[2, 3])``. onnxruntime's NCHWc layout transformer (the fast path for conv
nets on x86) keeps ``GlobalAveragePool`` in NCHWc but not ``ReduceMean``, so every squeeze-excite
block and the final pool pay two layout reorders (measured on mobilenet_v3_large: 33 reorders
instead of 28). :func:`global_pool_pass` rewrites such nodes to ``GlobalAveragePool`` (followed
by ``Flatten`` when ``keepdims=0``); the result is the same tensor, and the optimised graph
matches the TorchScript exporter's. Measured effect on latency is small (dense
mobilenet_v3_large, 1 thread: 6.55 ms either way); it removes a layout hazard rather than a
hot spot.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def rewrite_file(tmp: Path) -> int:
    """Apply shrink's ONNX rewrites to the file in place; returns the file's default opset."""
    import onnx

    proto = onnx.load(str(tmp))
    if global_pool_pass(proto):
        onnx.save(proto, str(tmp))
    return next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def global_pool_pass(proto: Any) -> int:
    """Rewrite ``ReduceMean`` over the spatial axes of 4-D tensors to ``GlobalAveragePool``.

    In place on an ``onnx.ModelProto``; only nodes whose input rank is known to be 4 and whose
    axes are exactly {2, 3} (constant, negative axes allowed) are touched.

    Returns:
        The number of nodes rewritten.
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in (*graph.input, *graph.value_info, *graph.output)
             if v.type.tensor_type.HasField("shape")}
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    new_nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = (consts.get(node.input[1]) if len(node.input) > 1 else None)
        axes_list = [int(a) for a in axes.reshape(-1)] if axes is not None else attrs.get("axes")
        if (node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx")
                or ranks.get(node.input[0]) != 4 or axes_list is None
                or sorted(a % 4 for a in axes_list) != [2, 3]):
            new_nodes.append(node)
            continue
        count += 1
        if attrs.get("keepdims", 1):
            new_nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]],
                                              list(node.output), name=f"{node.name}_gap"))
        else:
            pooled = f"{node.output[0]}_gap"
            new_nodes.append(helper.make_node("GlobalAveragePool", [node.input[0]], [pooled],
                                              name=f"{node.name}_gap"))
            new_nodes.append(helper.make_node("Flatten", [pooled], list(node.output), axis=1,
                                              name=f"{node.name}_flatten"))
    if count:
        del graph.node[:]
        graph.node.extend(new_nodes)
        used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
        unused = [i for i in graph.initializer if i.name not in used]
        for init in unused:  # the ReduceMean axes constants
            graph.initializer.remove(init)
    return count


def ort_optimize(tmp: Path) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    optimized = tmp.with_name(tmp.name + ".opt")
    opts.optimized_model_filepath = str(optimized)
    try:
        ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
        os.replace(optimized, tmp)
    finally:
        optimized.unlink(missing_ok=True)
