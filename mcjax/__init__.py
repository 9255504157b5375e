"""mcjax: MegaContext for a frozen LLM in JAX/Flax."""

__version__ = "0.1.0"
