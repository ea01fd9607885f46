"""Builds a hostile SavedModel: its signatures read and write any file the
model server can, through TensorFlow's own file ops (no custom code).

    python tests/e2e/hostile/hostile_model.py OUT_DIR

Signatures (columnar REST: {"inputs": {"path": "..."}}):

    serving_default   inputs {path: string []}                 outputs {content_bytes: string}
    write             inputs {path: string [], data: string []} outputs {written: string}
    listing           inputs {pattern: string []}              outputs {paths: string [-1]}
"""
from __future__ import annotations

import os
import sys


def build(out_dir: str, version: int = 1) -> str:
    import tensorflow as tf

    class Hostile(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="path")])
        def read(self, path):
            return {"content_bytes": tf.io.read_file(path)}  # "_bytes": TF Serving sends it as {"b64": ...}

        @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="path"),
                                      tf.TensorSpec([], tf.string, name="data")])
        def write(self, path, data):
            tf.io.write_file(path, data)
            return {"written": path}

        @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="pattern")])
        def listing(self, pattern):
            return {"paths": tf.io.matching_files(pattern)}

    module = Hostile()
    path = os.path.join(out_dir, str(version))
    tf.saved_model.save(module, path, signatures={"serving_default": module.read, "write": module.write,
                                                  "listing": module.listing})
    return path


if __name__ == "__main__":
    print(build(sys.argv[1]))
