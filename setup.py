"""fula_jax: layer-by-layer functional and representational similarity of networks."""

from setuptools import find_packages, setup

setup(
    name="fula_jax",
    version="0.1.0",
    description=("Model stitching (TLM, SLM, DM, FuLA) and representational similarity "
                 "(CKA family, Procrustes, CCA) over full cross-layer matrices, in JAX."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fula_jax", "fula_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "absl-py>=2.1",
        "chex>=0.1.88",
        "clu>=0.0.12",
        "etils[epath]>=1.7",
        "flax>=0.10.4",
        "grain>=0.2.10",  # streamed datasets (fula_jax.data.records)
        "importlib_resources>=6.0",  # tensorflow-datasets needs it and does not say so.
        "jax>=0.5.0",
        "matplotlib>=3.8",
        "ml-collections>=0.1.1",
        "numpy>=1.26",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "pandas>=2.0",
        "pillow>=10.0",  # decoding folder: datasets
        "safetensors>=0.4",  # pretrained weights (fula_jax.models.weights)
        "scikit-learn>=1.3",
        "tensorboard>=2.16",  # clu's metric writers
        "tensorflow-cpu>=2.16",  # clu's metric writers and tfds' full readers
        "tensorflow-datasets>=4.9.7",
    ],
    extras_require={
        # PyTorch checkpoints (.pt, .pth, .ckpt) and models.from_torch (through torchax;
        # torchax 0.0.13 does not import with torch 2.14: requirements-test.txt pins a
        # pair that works)
        "torch": ["torch>=2.1", "torchvision>=0.16", "timm>=1.0", "torchax>=0.0.14.dev0"],
        "test": ["pytest>=8.0", "pytest-xdist>=3.0", "torch>=2.1", "torchvision>=0.16", "timm>=1.0",
                 "torchax>=0.0.14.dev0",
                 "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29", "pytorch-cka>=1.1"],
    },
)
