"""``python -m softce_multi {check,bench,demo} [options]``: see :mod:`softce_multi._cli`."""

import sys

from softce_multi._cli import main

if __name__ == "__main__":
    sys.exit(main())
