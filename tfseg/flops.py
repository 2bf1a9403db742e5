"""Floating-point work of networks and train steps, counted from the traced graph's shapes, and
the machine's own matmul peak.

FLOPs are counted, not estimated from parameters: a function (a network's forward pass, or a
method's whole train step) is traced with `tf.function` for fixed input shapes, and every
multiply-accumulate op of the traced graph is counted from its operand shapes
(`count_graph_flops`): convolutions (2D/3D), transposed convolutions (the conv backprop-input
ops), the weight-gradient ops of a backward pass, depthwise convolutions, matmuls and batched
matmuls; 1 MAC = 2 FLOPs. Element-wise work (activations, normalisation, losses, the optimizer
update) is left out: on these networks it is a few percent of the total, and it is bound by
memory bandwidth, not by the arithmetic peak the count is compared with.

Conventions (docs/performance.md):
- a train step is reported as 3× the forward FLOPs of the network calls it makes (forward,
  backward to the inputs, backward to the weights: each costs one forward's MACs);
  `train_step_graph_flops` is the count of the traced step itself, which is lower when a
  step does not back-propagate through every call (e.g. a frozen generator) and a check of the
  3× rule otherwise;
- the peak is the best of a few timed square matmuls (`matmul_peak`) in float32 and bfloat16,
  measured in the same process, so "fraction of peak" compares like with like on a loaded
  machine.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

__all__ = ["count_graph_flops", "count_function_flops", "forward_flops", "matmul_peak",
           "MAC_OPS"]

# Ops whose multiply-accumulates are counted, by how their shapes give the MACs.
_CONV = ("Conv2D", "Conv3D", "Conv2DBackpropFilter", "Conv3DBackpropFilterV2",
         "Conv2DBackpropInput", "Conv3DBackpropInputV2", "DepthwiseConv2dNative",
         "DepthwiseConv2dNativeBackpropInput", "DepthwiseConv2dNativeBackpropFilter")
_MATMUL = ("MatMul", "BatchMatMul", "BatchMatMulV2", "BatchMatMulV3")
MAC_OPS = _CONV + _MATMUL


def _shape(tensor) -> list[int] | None:
    shape = tensor.shape
    if shape.rank is None or any(d is None for d in shape.as_list()):
        return None
    return shape.as_list()


def _op_macs(op) -> int | None:
    """Multiply-accumulates of one op from its static shapes (None: shapes unknown)."""
    kind = op.type
    if kind in _MATMUL:
        a, b = _shape(op.inputs[0]), _shape(op.outputs[0])
        if a is None or b is None:
            return None
        adjoint = op.get_attr("transpose_a") if kind == "MatMul" else op.get_attr("adj_x")
        inner = a[-2] if adjoint else a[-1]
        return int(math.prod(b)) * int(inner)  # each output element: `inner` MACs
    if kind.startswith("Depthwise"):
        # Depthwise: each output element of the per-channel conv costs kernel-volume MACs.
        if kind.endswith("BackpropInput"):
            grad, filt = _shape(op.inputs[2]), _shape(op.inputs[1])
        elif kind.endswith("BackpropFilter"):  # its output is the filter's gradient
            grad, filt = _shape(op.inputs[2]), _shape(op.outputs[0])
        else:
            grad, filt = _shape(op.outputs[0]), _shape(op.inputs[1])
        if grad is None or filt is None:
            return None
        return int(math.prod(grad)) * int(math.prod(filt[:-2]))
    # Convolutions: MACs = (positions of the low-resolution side) × filter volume × in × out,
    # i.e. numel(output of the forward conv) / C_out × numel(filter).
    if kind in ("Conv2D", "Conv3D"):
        side, filt = _shape(op.outputs[0]), _shape(op.inputs[1])
    elif "BackpropInput" in kind:  # inputs: input_sizes, filter, out_backprop
        side, filt = _shape(op.inputs[2]), _shape(op.inputs[1])
    else:  # BackpropFilter: input, filter_sizes, out_backprop -> the filter's gradient
        side, filt = _shape(op.inputs[2]), _shape(op.outputs[0])
    if side is None or filt is None:
        return None
    return int(math.prod(side[:-1])) * int(math.prod(filt))


def count_graph_flops(graph: tf.Graph) -> dict[str, Any]:
    """FLOPs (2 × MACs) of the MAC ops of `graph` and of the functions it calls.

    Returns:
      {"flops": total, "by_op": {op type: flops}, "unknown": ops whose shapes were not static}.
    """
    by_op: dict[str, int] = {}
    unknown = 0
    graphs = [graph]
    seen: set[str] = set()
    # Nested function bodies (control flow, PartitionedCall) live in the graph's library.
    for name, function in getattr(graph, "_functions", {}).items():
        if name not in seen and hasattr(function, "graph"):
            seen.add(name)
            graphs.append(function.graph)
    for each in graphs:
        for op in each.get_operations():
            if op.type not in MAC_OPS:
                continue
            macs = _op_macs(op)
            if macs is None:
                unknown += 1
                continue
            by_op[op.type] = by_op.get(op.type, 0) + 2 * macs
    return {"flops": int(sum(by_op.values())), "by_op": by_op, "unknown": unknown}


def count_function_flops(function: Callable, *specs) -> dict[str, Any]:
    """Traces `function` for the given `tf.TensorSpec`s (nested structures allowed) and counts
    its FLOPs (`count_graph_flops`). Variables are not changed: tracing runs nothing."""
    concrete = tf.function(function).get_concrete_function(*specs)
    return count_graph_flops(concrete.graph)


def forward_flops(network, input_shape: Sequence[int], training: bool = False) -> int:
    """FLOPs of one forward pass of `network` on a batch of `input_shape` (batch included)."""
    spec = tf.TensorSpec([int(v) for v in input_shape], tf.float32)
    return count_function_flops(lambda x: network(x, training=training), spec)["flops"]


def matmul_peak(dtype: str = "float32", size: int = 2048, repeats: int = 5,
                min_seconds: float = 0.2) -> dict[str, float]:
    """The machine's achieved matmul throughput: the best of `repeats` timings of square
    `size`² matmuls (graph mode, several per timing so that each lasts >= `min_seconds`).

    Args:
      dtype: "float32" or "bfloat16" (inputs and output; oneDNN uses AMX/AVX512-BF16 for
        bfloat16 where the CPU has it).

    Returns:
      {"flops_per_s": best, "flops_per_s_median", "size", "dtype", "matmuls_per_timing"}.
    """
    dt = tf.as_dtype(dtype)
    rng = np.random.default_rng(0)
    a = tf.cast(tf.constant(rng.standard_normal((size, size)), tf.float32), dt)
    b = tf.cast(tf.constant(rng.standard_normal((size, size)), tf.float32), dt)

    @tf.function
    def chain(a, b, n):
        total = tf.zeros((), tf.float32)
        for _ in tf.range(n):  # each product depends on nothing else: n independent matmuls
            total += tf.cast(tf.matmul(a, b)[0, 0], tf.float32)
        return total

    flops_one = 2.0 * size ** 3
    start = time.perf_counter()
    chain(a, b, tf.constant(1)).numpy()  # trace
    chain(a, b, tf.constant(1)).numpy()
    one = max(time.perf_counter() - start, 1e-6) / 2
    count = max(1, int(math.ceil(min_seconds / one)))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        chain(a, b, tf.constant(count)).numpy()
        rates.append(flops_one * count / (time.perf_counter() - start))
    return {"flops_per_s": max(rates), "flops_per_s_median": float(np.median(rates)),
            "size": size, "dtype": dtype, "matmuls_per_timing": count}
