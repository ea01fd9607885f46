"""The linear regression demo trainer: `python -m trainer.task`."""
