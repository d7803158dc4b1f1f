"""`python -m clip_pyfunc.cli`: the `clip-pyfunc` command."""

import sys

from clip_pyfunc.cli import main

sys.exit(main())
