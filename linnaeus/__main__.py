from linnaeus.cli import main
from linnaeus.utils.exit import exit_process

exit_process(main())  # `python -m linnaeus ...`: skips the 1-2 s module teardown once torch is loaded
