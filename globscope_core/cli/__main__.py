"""`python -m globscope_core.cli` (also under torchrun)."""
import os
import sys

from . import main

code = main()
if "TORCHELASTIC_RUN_ID" in os.environ:
    # under torchrun, once the work is written and the process group destroyed, leave without the interpreter's
    # teardown: gloo's threads were seen to abort it (SIGABRT, "terminate called without an active exception",
    # once in about 50 two-node runs), which turned a finished landscape into a failed node
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
sys.exit(code)
