"""``python -m embedder.cli ...``, e.g. to run the service under a supervisor."""
import sys

from . import main

sys.exit(main())
