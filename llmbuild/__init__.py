"""llmbuild: ahead-of-time build system for LLM inference engines."""

import os

__version__ = "0.1.0"

# torch's large CPU allocations (prefill activations, the widened weight panels of prefill GEMMs, the KV cache) on
# transparent huge pages: a 16-prompt TinyLlama prefill on a 2-core EPYC took 4-6% less time in bf16, 14% in int4.
# c10 reads the variable once, at torch's first allocation, so it is set here, before anything imports torch; a value
# the user set wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
