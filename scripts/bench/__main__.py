"""`python -m scripts.bench`: the benchmark of scripts/bench/bench.py."""

import sys

from scripts.bench.bench import main

sys.exit(main())
