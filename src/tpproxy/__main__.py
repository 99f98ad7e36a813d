"""`python -m tpproxy`."""

import sys

from tpproxy.cli import main

sys.exit(main())
