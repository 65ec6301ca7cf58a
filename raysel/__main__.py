"""`python -m raysel VERB ...`: the same CLI as the `raysel` command."""

import sys

from raysel.cli import main

sys.exit(main())
