"""``python -m waferllm``: the same command line as ``waferllm``."""

import sys

from waferllm.interfaces.cli import main

if __name__ == "__main__":
    sys.exit(main())
