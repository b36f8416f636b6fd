"""`python scripts/keys.py …`: `tokengate-keys`, for a shell without the venv on PATH."""

import sys

from tokengate_core.tools.keys import main

if __name__ == "__main__":
    sys.exit(main())
