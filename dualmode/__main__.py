import sys

from dualmode.cli import main

sys.exit(main())
