"""Make the training frameworks' own checkpoint calls work with a ShardedOptimizer.

One small module per framework; none is imported here, and each imports its framework only
when used, so `import shardoptim` never needs transformers, accelerate or lightning.

- `shardoptim.integrations.transformers.ShardedOptimizerCallback`: a Hugging Face `Trainer`
  callback that consolidates the optimizer state on every rank right before Trainer saves
  a checkpoint (Trainer then calls `optimizer.state_dict()` on rank 0 only).
  `Trainer(..., optimizers=(opt, None), callbacks=[ShardedOptimizerCallback()])`.
- `shardoptim.integrations.accelerate.register(accelerator)`: a save-state pre-hook that
  consolidates before `accelerator.save_state()` (which calls `state_dict()` on every rank
  and writes rank 0's).
- `shardoptim.integrations.lightning`: nothing to add. Lightning's strategies call
  `consolidate_state_dict()` on every rank and `state_dict()` on global rank 0 for any
  optimizer that has one (as for torch's ZeroRedundancyOptimizer); return the
  ShardedOptimizer from `configure_optimizers` and save and resume as usual.

Loading needs no help in any of them: each calls `load_state_dict` with the full dict on
every rank, which is what ShardedOptimizer expects.
"""
