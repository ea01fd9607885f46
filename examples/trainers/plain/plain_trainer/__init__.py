"""A plain-Python trainer (no TensorFlow): `python -m plain_trainer.task --x1 X --x2 Y`."""
