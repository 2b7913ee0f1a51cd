"""`python -m dume build CONFIG.yaml`: the same as the `dume` console script."""

import sys

from dume.cli import main

sys.exit(main())
