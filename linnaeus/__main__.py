import sys

from linnaeus.cli import main

sys.exit(main())
