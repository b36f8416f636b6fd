"""`python scripts/report.py …`: `tokengate-report`, for a shell without the venv on PATH."""

import sys

from tokengate_core.tools.report import main

if __name__ == "__main__":
    sys.exit(main())
