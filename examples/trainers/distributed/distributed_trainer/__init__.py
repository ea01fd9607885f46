"""Distributed linear regression trainer: `python -m distributed_trainer.task`."""
