"""`python -m services.cli ...` is the `edgesplit` command."""

import sys

from services.cli.main import main

sys.exit(main())
