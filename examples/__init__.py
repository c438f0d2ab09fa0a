"""Runnable examples; each is a script with --steps and --logdir."""
