"""``python -m pipeline.cli``: the ``likerank`` command without the installed entry point."""

import sys

from pipeline.cli.main import main

sys.exit(main())
