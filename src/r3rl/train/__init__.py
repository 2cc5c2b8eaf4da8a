"""The trainer: batches, losses, the RL step, the run loop, checkpoints and metrics (`r3rl train`)."""
