"""Lightning: nothing to add; a ShardedOptimizer works with Lightning's own checkpointing.

Return it from `configure_optimizers` (Lightning has moved the model to its device and started
the process group by then):

    def configure_optimizers(self):
        return shardoptim.ShardedOptimizer(self.parameters(), torch.optim.AdamW, lr=1e-3)

Lightning's strategies save optimizer state through `Strategy.optimizer_state`, which calls
`consolidate_state_dict()` on every rank for any optimizer that has that method (the path built
for torch's ZeroRedundancyOptimizer) and then `state_dict()` on global rank 0, `{}` elsewhere.
ModelCheckpoint and `trainer.save_checkpoint` therefore write the full optimizer state, and
`trainer.fit(..., ckpt_path=...)` loads it with `load_state_dict` on every rank. Use stage 1 with
the DDP strategy (gradient clipping with `gradient_clip_val` works there); stage 2 reduces the
gradients itself, so a DDP-wrapped model would reduce them twice, and Lightning's clipping would
see no gradients.

Lightning Fabric takes the same path (`Strategy.get_optimizer_state` in `fabric.save`); it is
not tested here.

This module has no code: it exists so that the integration is where the others are, and is
tested in tests/integrations/test_frameworks.py.
"""

from __future__ import annotations

__all__: list[str] = []
