import sys

from dualmode.apps.cli import main

sys.exit(main())
