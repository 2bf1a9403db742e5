"""What a method's train step costs beyond its networks' own forward and backward passes.

The reference ("plain Keras twin") of a train step is built from the step itself:

1. `record_step` traces `method.train_step` once on the batch's shapes and records
   - every top-level network call (the network, its input shapes and `training=`): for the
     supervised U-Net one call of the segmentor; for a GAN step the generator, the
     discriminator on real and fake batches, the segmentor, and so on;
   - every gradient the step asks for (`tf.GradientTape.gradient`: one per optimizer, plus any
     gradient with respect to an input such as a virtual-adversarial direction): its sources
     and the network calls its loss depends on;
   - which calls feed which (the traced graph's data flow; a `stop_gradient` cuts it): in a
     task_aug generator stage the generator's output reaches the segmentor and the
     discriminator, so the generator's loss is back-propagated through both;
2. `reference_step` is a `tf.function` that makes exactly those calls on constant inputs (the
   step's own batch where the shapes match), links a call's input to the calls that feed it
   (a zero-weighted mean of their outputs: the same backward paths, no extra work worth
   counting), puts a plain loss on each call (class-weighted sparse cross-entropy for calls
   whose output has the segmentor's channels, as the issue's Keras twin; the mean of the
   output otherwise), and for each recorded gradient back-propagates the sum of the plain
   losses of the calls that gradient's loss depends on (each gradient with its own weight, so
   that graph optimisation cannot merge two backward passes through a shared network into one:
   the method's losses differ, so it cannot either) to the same sources, then applies a
   fresh Adam to each variable gradient: the networks' forward and backward passes that the
   method's algorithm needs, and nothing else (no pipeline, no augmentation, no warps, no
   trackers, no gradient norms, no casts beyond the layers' own);
3. `time_interleaved` times the method's compiled train function and the reference in turns
   (A, B, A, B, ...), so that other processes on the machine slow both alike; the ratio of the
   medians is the overhead (1.0 = none).

A step that asks for no gradient through a tape (a toy) gets the older, coarser reference: one
loss over every call, back-propagated once to every network (an upper bound of the networks'
own work).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

__all__ = ["NetworkCall", "GradientRequest", "record_step", "record_network_calls",
           "reference_step", "time_interleaved", "batch_spec", "block"]

# Ops through which no gradient flows: data flow through them does not link two calls.
_NO_GRADIENT_OPS = frozenset({"StopGradient", "PreventGradient"})


class NetworkCall:
    """One network call of a traced train step.

    `inputs_from`: indices of the earlier calls whose outputs the call's inputs depend on
    (through ops a gradient passes); `input_sources`: indices of the tensor sources of
    gradient requests (e.g. a virtual-adversarial direction) its inputs depend on.
    """

    def __init__(self, network: keras.Model, input_shapes: list[list[int]], training):
        self.network = network
        self.input_shapes = input_shapes
        self.training = training
        self.inputs_from: list[int] = []
        self.input_sources: list[int] = []
        self._input_slots: list[tuple[int, int]] = []
        self._input_tensors: list = []
        self._output_tensors: list = []

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network.name, "input_shapes": self.input_shapes,
                "training": self.training, "inputs_from": self.inputs_from}


class GradientRequest:
    """One `tape.gradient` of a traced train step.

    `calls`: indices of the network calls its loss depends on; `variables`: its variable
    sources (an optimizer's networks' weights), or None when it asks for the gradient with
    respect to tensors; `tensor_sources`: indices of those tensor sources.
    """

    def __init__(self, targets: list, sources: list):
        self._targets = targets
        self._sources = sources
        self.calls: list[int] = []
        self.variables = None
        self.tensor_sources: list[int] = []
        self._slots: list[tuple[int, int]] = []

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls,
                "variables": None if self.variables is None else len(self.variables),
                "tensor_sources": self.tensor_sources}


class StepTrace:
    """`record_step`'s result: calls, gradient requests and the traced concrete function."""

    def __init__(self, calls: list[NetworkCall], gradients: list[GradientRequest], concrete):
        self.calls, self.gradients, self.concrete = calls, gradients, concrete


def batch_spec(batch: Any) -> Any:
    """`tf.TensorSpec`s of a (nested) batch of tensors."""
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), batch)


def _is_variable(value) -> bool:
    return isinstance(value, (tf.Variable, keras.Variable))


def record_step(method: keras.Model, batch: Any) -> StepTrace:
    """Traces `method.train_step` on the shapes of `batch`: its network calls, its gradient
    requests and the data flow between them (module docstring, step 1).

    Only top-level calls are recorded (a network called from inside another network's call is
    part of that call). Nothing runs: tracing builds a graph and changes no variable.
    """
    calls: list[NetworkCall] = []
    gradients: list[GradientRequest] = []
    depth = [0]
    original = keras.layers.Layer.__call__
    original_gradient = tf.GradientTape.gradient

    def recording_call(layer, *args, **kwargs):
        is_network = isinstance(layer, keras.Model) and layer is not method
        call = None
        if is_network and depth[0] == 0:
            inputs = args[0] if args else kwargs.get("inputs")
            flat = [t for t in tf.nest.flatten(inputs) if tf.is_tensor(t)]
            call = NetworkCall(layer, [list(t.shape) for t in flat], kwargs.get("training"))
            call._input_tensors = flat
            calls.append(call)
        if is_network:
            depth[0] += 1
        try:
            outputs = original(layer, *args, **kwargs)
        finally:
            if is_network:
                depth[0] -= 1
        if call is not None:
            call._output_tensors = [t for t in tf.nest.flatten(outputs) if tf.is_tensor(t)]
        return outputs

    def recording_gradient(tape, target, sources, *args, **kwargs):
        gradients.append(GradientRequest(
            [t for t in tf.nest.flatten(target) if tf.is_tensor(t)], tf.nest.flatten(sources)))
        return original_gradient(tape, target, sources, *args, **kwargs)

    keras.layers.Layer.__call__ = recording_call
    tf.GradientTape.gradient = recording_gradient
    try:
        concrete = tf.function(method.train_step).get_concrete_function(batch_spec(batch))
    finally:
        keras.layers.Layer.__call__ = original
        tf.GradientTape.gradient = original_gradient
    _link(calls, gradients, concrete.graph)
    return StepTrace(calls, gradients, concrete)


def _link(calls: list[NetworkCall], gradients: list[GradientRequest], graph) -> None:
    """Fills `inputs_from`, `input_sources` and the gradient requests' `calls` from the traced
    graph: one pass over its ops in creation (= topological) order, each op carrying the set
    of call outputs ("slots": bits 0..m-1, one per output tensor of each call) and tensor
    sources (bits m..) upstream of it along paths a gradient can take."""
    tensor_sources: list = []
    for request in gradients:
        variables = [s for s in request._sources if _is_variable(s)]
        tensors = [s for s in request._sources if not _is_variable(s) and tf.is_tensor(s)]
        request.variables = variables if variables and not tensors else None
        for t in tensors:
            if not any(t is u for u in tensor_sources):
                tensor_sources.append(t)
            request.tensor_sources.append(next(k for k, u in enumerate(tensor_sources)
                                               if u is t))
    slots = [(i, k) for i, call in enumerate(calls) for k in range(len(call._output_tensors))]
    m = len(slots)
    seeds: dict[str, int] = {}

    def seed(tensor, bit: int) -> None:
        if getattr(tensor, "graph", None) is graph:
            seeds[tensor.op.name] = seeds.get(tensor.op.name, 0) | (1 << bit)

    for bit, (i, k) in enumerate(slots):
        seed(calls[i]._output_tensors[k], bit)
    for k, t in enumerate(tensor_sources):
        seed(t, m + k)
    upstream: dict[str, int] = {}
    for op in graph.get_operations():
        bits = 0
        if op.type not in _NO_GRADIENT_OPS:
            for t in op.inputs:
                bits |= upstream.get(t.op.name, 0)
        upstream[op.name] = bits | seeds.get(op.name, 0)

    def bits_of(tensors) -> int:
        bits = 0
        for t in tensors:
            if getattr(t, "graph", None) is graph:
                bits |= upstream.get(t.op.name, 0)
        return bits

    def slots_of(bits: int, exclude: int = -1) -> list[int]:
        return [b for b in range(m) if bits >> b & 1 and slots[b][0] != exclude]

    for i, call in enumerate(calls):
        bits = bits_of(call._input_tensors)
        call._input_slots = [slots[b] for b in slots_of(bits, exclude=i)]
        call.inputs_from = sorted({j for j, _ in call._input_slots})
        call.input_sources = [k for k in range(len(tensor_sources)) if bits >> (m + k) & 1]
    for request in gradients:
        request._slots = [slots[b] for b in slots_of(bits_of(request._targets))]
        request.calls = sorted({i for i, _ in request._slots})


def record_network_calls(method: keras.Model, batch: Any) -> tuple[list[NetworkCall], Any]:
    """`record_step`'s calls and concrete function (calls in step order)."""
    trace = record_step(method, batch)
    return trace.calls, trace.concrete


def reference_step(method: keras.Model, calls: Sequence[NetworkCall] | StepTrace,
                   class_weights: Sequence[float] | None = None, batch: Any = None,
                   seed: int = 0) -> Callable[[], Any]:
    """The network work of a step alone (module docstring, step 2).

    Args:
      method: the method whose networks are called (their weights are updated by the
        reference's own optimizers: benchmark only).
      calls: `record_step`'s trace (the calls, their links and the step's gradient requests),
        or a bare list of calls (one loss over every call, one backward pass to every network).
      class_weights: weights of the cross-entropy on segmentor-shaped outputs (None: uniform).
      batch: the step's batch: a call whose input has the shape of one of its float tensors
        gets that tensor, and the cross-entropy uses its labels where their shape fits (the
        step's speed depends on the data: on this CPU random-normal images made the same step
        up to 20% slower than real ones); other inputs and labels are random.

    Returns:
      A no-argument function running one reference step (a compiled `tf.function`) and
      returning the sum of its plain losses (computed before its updates).
    """
    trace = calls if isinstance(calls, StepTrace) else None
    calls = list(trace.calls if trace else calls)
    requests = [r for r in (trace.gradients if trace else []) if r.calls]
    rng = np.random.default_rng(seed)
    num_outputs = int(method.segmentor.outputs[0].shape[-1])
    weights = tf.constant(class_weights if class_weights is not None else [1.0] * num_outputs,
                          tf.float32)
    tensors = [t for t in tf.nest.flatten(batch) if hasattr(t, "dtype")] if batch else []
    images = {tuple(t.shape): t for t in tensors if t.dtype.is_floating}
    label_maps = {tuple(t.shape): t for t in tensors if t.dtype.is_integer}
    inputs, labels = [], []   # labels: per call, one per output (None: mean loss)
    for call in calls:
        inputs.append([tf.cast(images[tuple(s)], tf.float32) if tuple(s) in images else
                       tf.constant(rng.standard_normal(s).astype(np.float32))
                       for s in call.input_shapes])
        shapes = [list(t.shape) for t in call._output_tensors]
        labels.append([])
        for output_shape in shapes:
            segmentation = output_shape[-1] == num_outputs and len(output_shape) >= 4
            known = label_maps.get(tuple(output_shape[:-1]))
            labels[-1].append(
                None if not segmentation else tf.cast(known, tf.int32) if known is not None
                else tf.constant(rng.integers(0, num_outputs, output_shape[:-1]), tf.int32))
    if requests:
        groups = [r.variables for r in requests if r.variables is not None]
    else:  # no recorded gradient: every network, one pass
        groups = []
        for call in calls:
            if call.network.trainable_variables and all(
                    call.network.trainable_variables[0] is not g[0] for g in groups):
                groups.append(list(call.network.trainable_variables))
    optimizers = []
    for group in groups:
        optimizer = keras.optimizers.Adam(1e-4)
        optimizer.build(group)
        optimizers.append(optimizer)
    # Weight of the links between calls: zero (values unchanged), a variable so that no graph
    # optimisation folds the link away and its backward path stays.
    link_weight = tf.Variable(0.0, trainable=False, name="reference_link_weight")
    num_sources = max([k + 1 for r in requests for k in r.tensor_sources] or [0])

    def apply(group_index: int, gradients, variables) -> None:
        pairs = [(g, v) for g, v in zip(gradients, variables) if g is not None]
        if pairs:
            optimizers[group_index].apply_gradients(pairs)

    @tf.function
    def step():
        with tf.GradientTape(persistent=bool(requests)) as tape:
            sources = [tf.zeros(()) for _ in range(num_sources)]
            for source in sources:
                tape.watch(source)
            outputs, losses = [], {}
            for i, (call, x, ys) in enumerate(zip(calls, inputs, labels)):
                x = list(x)
                links = [tf.reduce_mean(tf.cast(outputs[j][k], tf.float32))
                         for j, k in getattr(call, "_input_slots", [])]
                links += [sources[k] for k in getattr(call, "input_sources", [])]
                if links and requests:
                    x[0] = x[0] + link_weight * tf.add_n(links)
                out = call.network(x[0] if len(x) == 1 else x, training=bool(call.training))
                outs = [tf.cast(t, tf.float32) for t in tf.nest.flatten(out)][:len(ys)]
                outputs.append(outs)
                for k, (o, y) in enumerate(zip(outs, ys)):
                    if y is not None:
                        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(y, o)
                        losses[i, k] = tf.reduce_mean(ce * tf.gather(weights, y))
                    else:
                        losses[i, k] = tf.reduce_mean(o)
            total = tf.add_n(list(losses.values()))
            # A distinct weight per gradient: each backward pass gets its own upstream
            # gradient, as in the method (whose losses differ), so that graph optimisation
            # cannot merge two passes through a shared network into one (identical plain
            # losses would let it: the reference would then do less than the method must).
            request_losses = [(1.0 + r_index / 1024.0) * tf.add_n([losses[slot]
                                                                   for slot in r._slots])
                              for r_index, r in enumerate(requests)]
        if not requests:
            variables = [v for g in groups for v in g]
            gradients = tape.gradient(total, variables)
            start = 0
            for index, group in enumerate(groups):
                apply(index, gradients[start:start + len(group)], group)
                start += len(group)
            return total
        group_index, input_gradients = 0, []
        for request, loss in zip(requests, request_losses):
            if request.variables is not None:
                apply(group_index, tape.gradient(loss, request.variables), request.variables)
                group_index += 1
            else:  # used in the result (zero-weighted), or the graph would prune the pass
                input_gradients += [g for g in tape.gradient(
                    loss, [sources[k] for k in request.tensor_sources]) if g is not None]
        del tape
        if input_gradients:
            total = total + link_weight * tf.add_n(input_gradients)
        return total

    return step


def block(outputs) -> None:
    """Waits for a step's outputs (reading them back forces completion)."""
    for value in tf.nest.flatten(outputs):
        if hasattr(value, "numpy"):
            value.numpy()


def time_interleaved(functions: Mapping[str, Callable[[], Any]], steps: int, warmup: int = 2
                     ) -> dict[str, dict[str, float]]:
    """Times each function `steps` times in turns (after `warmup` untimed calls each); the order
    of the turn reverses every round (A B C, C B A, ...), so no function always runs right
    after the same other one.

    Returns:
      name -> {"median_s", "min_s", "mean_s", "cpu_median_s"}.
    """
    for function in functions.values():
        for _ in range(warmup):
            block(function())
    wall: dict[str, list[float]] = {name: [] for name in functions}
    cpu: dict[str, list[float]] = {name: [] for name in functions}
    order = list(functions.items())
    for round_index in range(steps):
        for name, function in (order if round_index % 2 == 0 else order[::-1]):
            start, cpu_start = time.perf_counter(), time.process_time()
            block(function())
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return {name: {"median_s": statistics.median(wall[name]), "min_s": min(wall[name]),
                   "mean_s": statistics.fmean(wall[name]),
                   "cpu_median_s": statistics.median(cpu[name])} for name in functions}
