"""What a method's train step costs beyond its networks' own forward and backward passes.

The reference ("plain Keras twin") of a train step is built from the step itself:

1. `record_network_calls` traces `method.train_step` once on the batch's shapes and records
   every top-level network call it makes (the network, its input shapes and `training=`);
   for the supervised U-Net that is one call of the segmentor, for a GAN step the generator,
   the discriminator on real and fake batches, the segmentor, and so on;
2. `reference_step` is a `tf.function` that makes exactly those calls on constant inputs (the
   step's own batch where the shapes match),
   back-propagates a plain loss through each (class-weighted sparse cross-entropy for calls
   whose output has the segmentor's channels, as the issue's Keras twin; the mean of the output
   otherwise) to the networks' trainable weights, and applies one fresh Adam per network: the
   network work of the step with nothing else (no pipeline, no augmentation, no trackers, no
   gradient norms, no casts beyond the layers' own);
3. `time_interleaved` times the method's compiled train function and the reference in turns
   (A, B, A, B, ...), so that other processes on the machine slow both alike; the ratio of the
   medians is the overhead (1.0 = none).

The reference back-propagates through every call, also the ones the method does not
differentiate (a frozen network's forward pass, pseudo-labels in inference mode), so a ratio
below 1 is possible; it is an upper bound of the networks' own work, not an estimate of it.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

__all__ = ["NetworkCall", "record_network_calls", "reference_step", "time_interleaved",
           "batch_spec", "block"]


class NetworkCall:
    """One network call of a traced train step."""

    def __init__(self, network: keras.Model, input_shapes: list[list[int]], training):
        self.network = network
        self.input_shapes = input_shapes
        self.training = training

    def to_dict(self) -> dict[str, Any]:
        return {"network": self.network.name, "input_shapes": self.input_shapes,
                "training": self.training}


def batch_spec(batch: Any) -> Any:
    """`tf.TensorSpec`s of a (nested) batch of tensors."""
    return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), batch)


def record_network_calls(method: keras.Model, batch: Any) -> tuple[list[NetworkCall], Any]:
    """Traces `method.train_step` on the shapes of `batch` and lists its network calls.

    Only top-level calls are recorded (a network called from inside another network's call is
    part of that call). Nothing runs: tracing builds a graph and changes no variable.

    Returns:
      (the calls in step order, the concrete function of the traced step).
    """
    calls: list[NetworkCall] = []
    depth = [0]
    original = keras.layers.Layer.__call__

    def recording_call(layer, *args, **kwargs):
        top = depth[0] == 0 and isinstance(layer, keras.Model) and layer is not method
        if top:
            inputs = args[0] if args else kwargs.get("inputs")
            shapes = [list(t.shape) for t in tf.nest.flatten(inputs)]
            calls.append(NetworkCall(layer, shapes, kwargs.get("training")))
        if isinstance(layer, keras.Model) and layer is not method:
            depth[0] += 1
        try:
            return original(layer, *args, **kwargs)
        finally:
            if isinstance(layer, keras.Model) and layer is not method:
                depth[0] -= 1

    keras.layers.Layer.__call__ = recording_call
    try:
        concrete = tf.function(method.train_step).get_concrete_function(batch_spec(batch))
    finally:
        keras.layers.Layer.__call__ = original
    return calls, concrete


def reference_step(method: keras.Model, calls: Sequence[NetworkCall],
                   class_weights: Sequence[float] | None = None, batch: Any = None,
                   seed: int = 0) -> Callable[[], Any]:
    """The network work of a step alone (module docstring, step 2).

    Args:
      method: the method whose networks are called (their weights are updated by the
        reference's own optimizers: benchmark only).
      calls: `record_network_calls`' list.
      class_weights: weights of the cross-entropy on segmentor-shaped outputs (None: uniform).
      batch: the step's batch: a call whose input has the shape of one of its float tensors
        gets that tensor, and the cross-entropy uses its labels where their shape fits (the
        step's speed depends on the data: on this CPU random-normal images made the same step
        up to 20% slower than real ones); other inputs and labels are random.

    Returns:
      A no-argument function running one reference step (a compiled `tf.function`).
    """
    rng = np.random.default_rng(seed)
    num_outputs = int(method.segmentor.outputs[0].shape[-1])
    weights = tf.constant(class_weights if class_weights is not None else [1.0] * num_outputs,
                          tf.float32)
    tensors = [t for t in tf.nest.flatten(batch) if hasattr(t, "dtype")] if batch else []
    images = {tuple(t.shape): t for t in tensors if t.dtype.is_floating}
    label_maps = {tuple(t.shape): t for t in tensors if t.dtype.is_integer}
    inputs, labels = [], []
    for call in calls:
        inputs.append([tf.cast(images[tuple(s)], tf.float32) if tuple(s) in images else
                       tf.constant(rng.standard_normal(s).astype(np.float32))
                       for s in call.input_shapes])
        output_shape = call.network.compute_output_shape(
            tuple(call.input_shapes[0]) if len(call.input_shapes) == 1
            else [tuple(s) for s in call.input_shapes])
        output_shape = tf.nest.flatten(output_shape, expand_composites=False)
        output_shape = list(output_shape) if not isinstance(output_shape[0], (list, tuple)) \
            else list(output_shape[0])
        segmentation = output_shape[-1] == num_outputs and len(output_shape) >= 4
        known = label_maps.get(tuple(output_shape[:-1]))
        labels.append(None if not segmentation else tf.cast(known, tf.int32) if known is not None
                      else tf.constant(rng.integers(0, num_outputs, output_shape[:-1]), tf.int32))
    networks: list[keras.Model] = []
    for call in calls:
        if call.network.trainable_variables and all(call.network is not n for n in networks):
            networks.append(call.network)
    optimizers = []
    for network in networks:
        optimizer = keras.optimizers.Adam(1e-4)
        optimizer.build(network.trainable_variables)
        optimizers.append(optimizer)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            losses = []
            for call, x, y in zip(calls, inputs, labels):
                out = call.network(x[0] if len(x) == 1 else x,
                                   training=bool(call.training))
                out = tf.cast(tf.nest.flatten(out)[0], tf.float32)
                if y is not None:
                    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(y, out)
                    losses.append(tf.reduce_mean(ce * tf.gather(weights, y)))
                else:
                    losses.append(tf.reduce_mean(out))
            loss = tf.add_n(losses)
        variables = [v for n in networks for v in n.trainable_variables]
        gradients = tape.gradient(loss, variables)
        start = 0
        for network, optimizer in zip(networks, optimizers):
            count = len(network.trainable_variables)
            pairs = [(g, v) for g, v in zip(gradients[start:start + count],
                                            variables[start:start + count]) if g is not None]
            if pairs:
                optimizer.apply_gradients(pairs)
            start += count
        return loss

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
