"""tfseg: few-shot and semi-supervised medical image segmentation in TensorFlow 2 / Keras 3.

The library takes frozen dataclasses and never reads flags or the environment at import time;
the command-line tools live in `launch/`.
"""
__version__ = "0.1.0"
