"""Command modules of the ``linnaeus`` console script (one module per command)."""
