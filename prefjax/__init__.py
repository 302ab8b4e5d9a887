"""prefjax: preference modeling in JAX/Flax.

Subpackages: ``losses`` (pure loss functions), ``models`` (Flax NNX decoders,
encoders, heads, HF/GGUF import, sampling), ``data`` (TFDS builders, grain
pipelines), ``parallel`` (meshes and sharding rules), ``train`` (training core),
``rewards`` and ``overopt`` (policy optimisation against reward models).
"""

__version__ = "0.1.0"
