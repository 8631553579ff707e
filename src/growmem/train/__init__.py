"""Training: experiment configs, the resumable trainer, checkpoints, sweeps."""
