"""tfseg: few-shot and semi-supervised medical image segmentation in TensorFlow 2 / Keras 3."""
from setuptools import find_packages, setup

setup(
    name="tfseg",
    version="0.1.0",
    description="Few-shot and semi-supervised medical image segmentation (TF2 / Keras 3)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tfseg", "tfseg.*", "preprocessing", "preprocessing.*",
                                    "launch", "launch.*"]),
    package_data={"tfseg": ["datasets/splits/*.json"]},
    install_requires=[
        # tensorflow-cpu and tensorflow install the same package; the CPU wheel is half the size.
        # The [gpu] extra swaps in the CUDA build (uninstall tensorflow-cpu first).
        "tensorflow-cpu>=2.18,<2.22; platform_machine=='x86_64'",
        "tensorflow>=2.18,<2.22; platform_machine!='x86_64'",
        "keras>=3.5,<4",
        "SimpleITK>=2.3,<3",
        "numpy>=1.26,<3",
        "scipy>=1.10",
        "absl-py>=2.0",
        "tensorboard>=2.18",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout>=2"],
        "gpu": ["tensorflow[and-cuda]>=2.18,<2.22"],
    },
)
