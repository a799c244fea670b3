import logging
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
