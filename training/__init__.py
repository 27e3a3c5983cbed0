"""The trainer's parts (train.py is the script that runs them): its config, checkpoints, metrics log."""
