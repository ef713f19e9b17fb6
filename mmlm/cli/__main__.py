"""`python -m mmlm.cli COMMAND ...`: the `mmlm` console script."""

import sys

from mmlm.cli import main

sys.exit(main())
