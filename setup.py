"""Installs tf_mamlpp and what it needs: `pip install -e .`."""

from setuptools import find_packages, setup

setup(
    name="tf_mamlpp",
    version="0.1.0",
    description="MAML++ (How to Train Your MAML, Antoniou et al., ICLR 2019) in TensorFlow 2 / Keras",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tf_mamlpp", "tf_mamlpp.*"]),
    # The published class lists of the few-shot benchmarks (benchmark_splits.py).
    package_data={"tf_mamlpp.data": ["class_lists/*.json"]},
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "tensorflow-datasets>=4.9",
        "keras>=3.0",
        "numpy",
        "absl-py",
        "tensorboard",
    ],
    extras_require={"test": ["pytest", "pytest-xdist"]},
)
