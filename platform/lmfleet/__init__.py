"""lmfleet: raw text to an aligned language model on Ray, one YAML per stage."""

import logging

__version__ = "0.1.0"

# bitsandbytes (adamw_8bit; PEFT and transformers import it too when it is installed) warns on CPU, at import,
# that a kernel for 4-bit matmuls lmfleet never uses is missing: a line in every worker's output otherwise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
