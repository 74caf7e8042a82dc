import sys

from setuptools import setup

install_requires = ["torch>=2.6", "numpy"]
if sys.platform.startswith("linux"):
    install_requires.append("triton>=3.2")

setup(
    name="subspace-ops",
    version="0.1.0",
    description="Fast, checkpoint-safe subspace (GaLore-style) optimizers for PyTorch with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level kernels/ folder installs as subspace_ops.kernels, so the install never
    # provides a top-level `kernels` package (an unrelated distribution on PyPI owns that name).
    packages=["subspace_ops", "subspace_ops.optim", "subspace_ops.projectors", "subspace_ops.demo", "subspace_ops.kernels"],
    package_dir={"subspace_ops": "subspace_ops", "subspace_ops.kernels": "kernels"},
    install_requires=install_requires,
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "transformers>=4.57.6", "accelerate>=1.15"],
        "bench": ["pytest-benchmark>=4", "matplotlib"],
        "plot": ["matplotlib"],
    },
)
