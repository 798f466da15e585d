"""``python -m bench [--quick]``: regenerate the benchmark reports."""
import sys

from bench.run import main

if __name__ == "__main__":
    sys.exit(main())
