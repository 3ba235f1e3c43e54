"""maskjax: masked transformers for vision in JAX/Flax."""

__version__ = "0.1.0"
