"""Command handlers: one module per ``linnaeus`` subcommand, each function taking the parsed arguments."""
