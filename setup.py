"""prefjax: preference modeling in JAX/Flax (reward models, DPO family, RL, overoptimization)."""
import setuptools

INSTALL_REQUIRES = [
    "jax",
    "flax",
    "optax",
    "orbax-checkpoint",
    "transformers",
    "tokenizers",  # imported directly by prefjax.models.hf_export (pinned in constraints.txt)
    "tensorflow-datasets",
    "array_record",
    "grain",
    "ml-collections",
    "absl-py",
    "chex",
    "safetensors",
    "gguf",
    "tensorboardX",
    "matplotlib",
    "scipy",
    "tqdm",
    "numpy",
]

EXTRAS_REQUIRE = {
    "cpu": ["jax[cpu]"],
    "cuda12": ["jax[cuda12]"],
    "tpu": ["jax[tpu]"],
    # torch + transformers only as a reference implementation for HF parity tests.
    "test": ["pytest", "pytest-xdist", "hypothesis", "torch==2.13.0", "transformers"],
}

setuptools.setup(
    name="prefjax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["prefjax", "prefjax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
