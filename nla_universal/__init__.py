"""nla-universal: one shared Natural Language Autoencoder for a pool of LLM architectures."""

__version__ = "0.1.0"
