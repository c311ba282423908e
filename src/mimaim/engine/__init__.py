"""The training engine: the loop, optimiser groups and schedule, checkpoints, distribution, logging."""
