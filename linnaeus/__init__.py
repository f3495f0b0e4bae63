"""Linnaeus: hierarchical taxonomic image classification with metadata, from a laptop to many GPU nodes."""

__version__ = "0.1.0"
