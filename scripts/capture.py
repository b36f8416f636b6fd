"""`python scripts/capture.py …`: `tokengate-capture`, for a shell without the venv on PATH."""

import sys

from tokengate_core.tools.capture import main

if __name__ == "__main__":
    sys.exit(main())
