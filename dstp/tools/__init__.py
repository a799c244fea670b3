"""The ``dstp inspect`` and ``dstp plan`` subcommands: a policy's per-rank shapes, and the
TP size a model needs for a device's memory."""
