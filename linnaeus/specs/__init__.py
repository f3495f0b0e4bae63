"""Frozen, typed views of the configuration, one per concern.

``linnaeus.config.resolve.resolve`` reads the config once and builds a ``RunSpec`` from these types; every component
takes its own spec, never the whole config. This package sits below everything but ``linnaeus.errors``: the data,
model, loss, augmentation and engine layers import their spec from here and never import ``linnaeus.config``.
"""

from linnaeus.specs.run import RunSpec

__all__ = ["RunSpec"]
