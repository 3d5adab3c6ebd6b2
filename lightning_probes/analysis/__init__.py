"""Offline analyses of trained networks: a model, a checkpoint and data in, numbers and figures out.

Unlike the probes (`lightning_probes.callbacks`), which watch a network while it trains, these run after
training, on saved checkpoints, and are driven by the ``lightning-probes`` commands
(`lightning_probes.commands`).

- `lightning_probes.analysis.ablation`: drop hidden units in order of their alignment and measure the damage
  (``lightning-probes ablate``); `ablation_sites` finds the units and masks them, `ablation_checkpoints` finds,
  loads and compares checkpoints, `ablation_figures` draws.
"""
