"""`python -m tpcontrol`."""

import sys

from tpcontrol.cli.main import main

sys.exit(main())
