"""``python -m likerank.cli``: the ``likerank`` command without the installed entry point."""

import sys

from likerank.cli.main import main

sys.exit(main())
