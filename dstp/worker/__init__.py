"""What every rank runs each step: the sharded model and its paged KV cache (model runner),
the step plan rank 0 broadcasts and its one packed upload (step plan, step inputs), the KV
budget, and the attention backends behind transformers' AttentionInterface."""
