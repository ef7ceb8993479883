"""The commands around the training loop, run as `python -m imgft COMMAND` (dispatched by cli.py)."""
