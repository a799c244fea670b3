import logging
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels (the CUDA backend's paged decode) run here in Triton's interpreter: set
# before anything imports triton, which reads it as each kernel is defined
os.environ.setdefault("TRITON_INTERPRET", "1")
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
