"""``python -m tritonslide``: the same command line as the ``tritonslide`` console script."""

import sys

from tritonslide.cli import main

if __name__ == "__main__":
    sys.exit(main())
