"""processor: a Trio worker daemon that computes text embeddings for pending AI tasks."""

__version__ = "0.1.0"
