"""Training: the loop, the step, EMA and checkpoints."""
