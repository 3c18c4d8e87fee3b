"""moe_jax: sparse Mixture-of-Experts transformers in JAX/Flax NNX."""
from setuptools import find_packages, setup

# Version ranges are the ones this code was tested with (2026-11). JAX and Flax NNX change
# their APIs between minor releases, so their upper bounds are the next minor version.
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow-datasets>=4.9.10,<5",
    "ml-collections>=1.1,<2",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "sentencepiece>=0.2.1,<0.3",
    "tensorboardX>=2.6,<3",
    "rich>=13,<16",
    "absl-py>=2.1,<3",
    "etils[epath]>=1.15,<2",
    "numpy>=2.0,<3",
    "safetensors>=0.8,<0.9",  # moe_jax.convert: Hugging Face checkpoints without torch
]

GCS = ["gcsfs>=2026.9,<2027", "google-cloud-storage>=3.17,<4"]
EXTRAS = {
    # The storage emulator runs the gs:// workdir test (tests/multihost/test_gcs.py) against a local server.
    "test": ["pytest>=9.0,<10", "pytest-xdist>=3.8,<4", "hypothesis>=6.150,<7",
             "gcp-storage-emulator>=2026.7,<2027", *GCS],
    # gs:// workdirs and data: etils.epath, Orbax's metadata and TFDS reach Cloud Storage through gcsfs,
    # tensorboardX through google-cloud-storage; Orbax's arrays go through tensorstore (installed with Orbax).
    "gcs": GCS,
    # experiments' plots and the notebooks, executed in CI with nbmake.
    "notebooks": ["matplotlib>=3.8,<4", "nbmake>=1.5,<2", "ipykernel>=6.29,<8", "nbformat>=5.10,<6"],
    # libtpu for Cloud TPU, and for compiling TPU programs on a CPU machine (moe_jax.aot); a TPU job's
    # workdir is a gs:// bucket.
    "tpu": ["jax[tpu]>=0.10.2,<0.11", *GCS],
    # NVIDIA GPUs (CUDA 12 wheels); not tested here: no GPU was available when this was written.
    "cuda": ["jax[cuda12]>=0.10.2,<0.11"],
}

setup(
    name="moe_jax",
    version="0.1.0",
    description="Sparse Mixture-of-Experts transformers (Switch, GShard, Mixtral, DeepSeekMoE) in JAX/Flax",
    packages=find_packages(include=["moe_jax", "moe_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["moe_jax=moe_jax.main:run"]},
)
