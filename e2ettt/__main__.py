import sys

from e2ettt.cli import main

sys.exit(main())
