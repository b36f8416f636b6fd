"""`python scripts/mock_openai.py …`: `tokengate-mock`, for a shell without the venv on PATH."""

import sys

from tokengate_core.tools.mock import main

if __name__ == "__main__":
    sys.exit(main())
