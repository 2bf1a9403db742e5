"""Distribution strategies for training, and the training loop used where `fit()` cannot run.

- "none": the default strategy (one device).
- "mirrored": `MirroredStrategy` over the local GPUs, or over the logical CPU devices when there is
  no GPU (several logical CPUs only exist if the caller configured them; on one CPU device this is
  a 1-replica strategy). `fit()` distributes the global batch.
- "multi_worker": `MultiWorkerMirroredStrategy` from the `TF_CONFIG` cluster description (read by
  TensorFlow itself). `fit()` is broken under it in Keras 3.15 (keras-team/keras#20585: its
  symbolic build reduces a `PerReplica` batch eagerly), so `fit_custom_loop` runs the same
  `train_step` with `strategy.run` and drives the same Keras callbacks. It must be created before
  any other TensorFlow op of the process, so create the strategy first.
"""
from __future__ import annotations

from typing import Callable, Sequence

import keras
import tensorflow as tf

STRATEGIES = ("none", "mirrored", "multi_worker")


def make_strategy(kind: str) -> tf.distribute.Strategy:
    """Creates the strategy named by `--distribute`.

    Raises:
      ValueError: for an unknown name, or "multi_worker" without a TF_CONFIG cluster.
    """
    if kind == "none":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = gpus or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if kind == "multi_worker":
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        if not resolver.cluster_spec().as_dict():
            raise ValueError("--distribute=multi_worker needs the TF_CONFIG environment variable "
                             "describing the cluster, e.g. TF_CONFIG='{\"cluster\": {\"worker\": "
                             "[\"host1:12345\", \"host2:12345\"]}, \"task\": {\"type\": "
                             "\"worker\", \"index\": 0}}' (one index per worker process).")
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    raise ValueError(f"Unknown distribution strategy {kind!r}; choose one of {list(STRATEGIES)}.")


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the worker that writes the run folder (the only worker outside multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if not is_multi_worker(strategy) or resolver is None:
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type is None or task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Blocks until every worker of a multi-worker strategy reaches it (a scalar all-reduce);
    returns at once otherwise."""
    if is_multi_worker(strategy):
        strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)


def per_replica_batch(global_batch: int, strategy: tf.distribute.Strategy, what: str) -> int:
    """The per-replica share of a global batch.

    Raises:
      ValueError: if the global batch does not split evenly over the replicas.
    """
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise ValueError(f"{what}={global_batch} does not split over {replicas} replicas; use a "
                         f"multiple of {replicas} (the batch size is global).")
    return global_batch // replicas


def fit_custom_loop(model: keras.Model, strategy: tf.distribute.Strategy,
                    dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset], *,
                    initial_epoch: int, epochs: int, steps_per_epoch: int,
                    callbacks: Sequence[keras.callbacks.Callback], verbose: int = 1) -> None:
    """`fit()`'s epoch/step/callback protocol around `strategy.run(model.train_step)`.

    Args:
      model: a compiled model whose `train_step(data)` returns its tracker results.
      strategy: the strategy (any; needed for multi-worker).
      dataset_fn: builds this input pipeline's dataset, batched per replica.
      initial_epoch / epochs: run epochs initial_epoch .. epochs - 1, as `fit()` numbers them.
      steps_per_epoch: steps between `on_epoch_end` calls.
      callbacks: Keras callbacks (validation, checkpointing, guards...).
      verbose: 0 silent, 1 progress bar, 2 one line per epoch.
    """
    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))

    @tf.function
    def train_function(iterator):
        outputs = strategy.run(model.train_step, args=(next(iterator),))
        return {name: strategy.reduce("MEAN", value, axis=None) for name, value in outputs.items()}

    callback_list = keras.callbacks.CallbackList(
        list(callbacks), add_history=True, add_progbar=verbose != 0, verbose=verbose,
        epochs=epochs, steps=steps_per_epoch, model=model)
    model.stop_training = False
    callback_list.on_train_begin()
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        logs = {}
        for step in range(steps_per_epoch):
            callback_list.on_train_batch_begin(step)
            logs = train_function(iterator)
            callback_list.on_train_batch_end(step, logs)
            if model.stop_training:
                break
        # The trackers are reset every epoch, so the last step's results are the epoch means.
        callback_list.on_epoch_end(epoch, {k: float(v) for k, v in logs.items()})
        if model.stop_training:
            break
    callback_list.on_train_end()
