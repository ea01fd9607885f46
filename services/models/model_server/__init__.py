"""The model-server replica: one SavedModel version behind TF Serving's gRPC API.

Run as `python -m services.models.model_server` (see `config.py` for the
flags). This process imports TensorFlow and uses the official
`tensorflow_serving.apis` modules, never the project's wire-compatible copies
under `cloudml.tfs` (both define the same protobuf symbols).
"""
