"""rerank: the core library of the re-ranking service (no Ray in here)."""

import os as _os

# torch's OpenMP threads sleep at barriers instead of spinning: on a small shared machine
# (2 cores, other processes busy) spinning threads made every op 3-6x slower (measured).
# Set before torch is imported; an explicit OMP_WAIT_POLICY in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
