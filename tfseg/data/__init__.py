"""TFRecord schema, splits, tf.data pipelines and joint augmentation."""
