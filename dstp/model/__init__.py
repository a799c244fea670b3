"""An HF model made tensor-parallel: built on meta, its modules swapped for TP layers by a
policy (``policies/``), each parameter filled from only this rank's slice of the
safetensors files. Also where a checkpoint comes from (a folder, the hub cache, the
built-in stories260K)."""
