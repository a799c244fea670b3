"""dstp's CPU kernels (sources in ``csrc/``), built on first use and chosen by the CPU's
flags, read once (``features``); ``gemm`` decides how bf16 linears of many rows compute."""
