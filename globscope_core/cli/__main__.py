"""`python -m globscope_core.cli` (also under torchrun)."""
import sys

from . import main

sys.exit(main())
