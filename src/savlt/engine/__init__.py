"""Training, evaluation, checkpoints and run folders."""
