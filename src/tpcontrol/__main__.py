"""`python -m tpcontrol`."""

import sys

from tpcontrol.cli import main

sys.exit(main())
