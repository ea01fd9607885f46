"""The victim's side of the cluster-port attack (test fixture, not hostile):
a distributed job's replica that serves TensorFlow's distributed runtime on
the port its TF_CONFIG names, as ParameterServerStrategy's servers do, and
idles.

    python -m hostile_trainer.cluster_server SECONDS
"""
from __future__ import annotations

import json
import os
import sys
import time


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import tensorflow as tf

    config = json.loads(os.environ["TF_CONFIG"])
    task = config["task"]
    tf.distribute.Server(tf.train.ClusterSpec(config["cluster"]), job_name=task["type"], task_index=task["index"],
                         protocol="grpc", start=True)
    print(f"serving {task['type']}-{task['index']}", flush=True)
    time.sleep(float(argv[0]) if argv else 120.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
