"""`python -m finemoe`: the `finemoe` command line."""
import sys

from finemoe.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
