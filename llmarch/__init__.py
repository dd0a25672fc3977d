"""llmarch: inspect, compare, convert and run open-weight LLM checkpoints."""

import time as _time

__version__ = "0.1.0"

# the moment Python first imported llmarch (boot clock, as /proc's process start times use): the
# run's "first token after start" falls back to it where the process's own start time is not when
# this program began (a shell that ran other commands first and then exec'd llmarch in its process)
IMPORTED_AT_BOOTTIME = _time.clock_gettime(_time.CLOCK_BOOTTIME) if hasattr(_time, "CLOCK_BOOTTIME") else None
