from linnaeus.cli import run

run()  # `python -m linnaeus ...`: see linnaeus.cli.run
