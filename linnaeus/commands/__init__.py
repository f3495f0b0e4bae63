"""Command handlers: one module per ``linnaeus`` command (arguments in, printing and exit codes out)."""
