"""Command handlers: one module per ``linnaeus`` command (printing, arguments, exit codes)."""
