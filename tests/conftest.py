"""Settings every test process shares, including the interpreters some tests start."""

import os

# Tests with 4 or 8 fake CPU devices run each device as a thread; on a loaded 2-core
# machine one of them can wait past XLA's default 40 s for a collective, which aborts the
# process. A longer limit keeps such a test a measure of the code, not of the machine's load.
_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds=900"
if _TIMEOUT not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), _TIMEOUT]))
