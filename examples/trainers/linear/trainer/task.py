"""Linear regression, the Cloud-ML demo: learn y = w*x + b from noisy samples of
y = 2x + 10, then export a SavedModel that TensorFlow Serving (and Cloud-ML's
model servers) can load.

    python -m trainer.task --optimizer sgd --learning_rate 0.1 --max_epochs 10

Outputs under --output_path (default $CLOUDML_OUTPUT_PATH, a directory or an
fsspec URI):

    tensorboard/       summary event files (scalars loss, w, b per epoch)
    model/1/           SavedModel, TF Serving's base-path layout (version 1);
                       signature `serving_default`:
                         inputs  keys int32 [None, 1], X float32 [None, 1]
                         outputs keys (echoed), prediction float32 [None, 1]

Each epoch's mean loss is printed ("Epoch: 3, loss: 0.25") and reported with
`cloudml.report(step=epoch, loss=...)`.

The model works on standardized inputs, x' = (x - mean) / std, with mean and
std of the training data baked into the exported graph: plain SGD then
converges in a few epochs whatever the range of x. The printed w and b are
the coefficients in the original units.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

try:
    from cloudml import report
except ImportError:  # running outside a Cloud-ML environment

    def report(step, **metrics):
        pass


from tensorflow.core.framework import summary_pb2  # noqa: E402

TRUE_W, TRUE_B = 2.0, 10.0
SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
).SerializeToString()
OPTIMIZERS = ("sgd", "ftrl", "adam", "adagrad")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer.task", description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    parser.add_argument("--learning_rate", "--learning-rate", type=float, default=0.1)
    parser.add_argument("--max_epochs", "--max-epochs", type=int, default=10)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64)
    parser.add_argument("--samples", type=int, default=2000, help="generated training examples")
    parser.add_argument("--noise", type=float, default=0.5, help="std of the noise added to 2x+10")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--output_path", "--output-path",
        default=os.environ.get("CLOUDML_OUTPUT_PATH") or "output",
        help="directory or fsspec URI (default: $CLOUDML_OUTPUT_PATH, else ./output)",
    )
    parser.add_argument("--model_version", "--model-version", type=int, default=1)
    args = parser.parse_args(argv)
    if args.max_epochs < 1 or args.batch_size < 1 or args.samples < 2 or args.learning_rate <= 0:
        parser.error("--max_epochs, --batch_size, --learning_rate must be positive and --samples >= 2")
    return args


def generate_data(samples: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 50.0, size=(samples, 1)).astype(np.float32)
    y = (TRUE_W * x + TRUE_B + rng.normal(0.0, noise, size=(samples, 1))).astype(np.float32)
    return x, y


class LinearModel(tf.Module):
    """prediction = w * (x - mean) / std + b."""

    def __init__(self, x_mean: float, x_std: float):
        super().__init__(name="linear")
        self.x_mean = float(x_mean)
        self.x_std = float(x_std)
        self.w = tf.Variable(0.0, dtype=tf.float32, name="w")
        self.b = tf.Variable(0.0, dtype=tf.float32, name="b")

    def __call__(self, x):
        return self.w * ((x - self.x_mean) / self.x_std) + self.b

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 1], tf.int32, name="keys"),
            tf.TensorSpec([None, 1], tf.float32, name="X"),
        ]
    )
    def serve(self, keys, X):
        return {"keys": tf.identity(keys), "prediction": self(X)}

    def coefficients(self) -> tuple[float, float]:
        """w and b in the original units of x."""
        w, b = float(self.w.numpy()), float(self.b.numpy())
        return w / self.x_std, b - w * self.x_mean / self.x_std


def summary_scalar(name: str, value: float, step: int) -> None:
    """tf.summary.scalar without the `tensorboard` package (TF 2.21 does not
    depend on it): the same event TensorBoard's scalar plugin writes."""
    tf.summary.write(name, tf.constant(value, tf.float32), step=step, metadata=SCALAR_METADATA)


def make_optimizer(name: str, learning_rate: float):
    optimizers = tf.keras.optimizers
    return {
        "sgd": optimizers.SGD,
        "ftrl": optimizers.Ftrl,
        "adam": optimizers.Adam,
        "adagrad": optimizers.Adagrad,
    }[name](learning_rate=learning_rate)


class Output:
    """A local directory for the outputs; for a remote fsspec URI, a staging
    directory uploaded by `publish()` at the end."""

    def __init__(self, output_path: str):
        self.uri = output_path
        if output_path.startswith("file://"):
            output_path = output_path[len("file://"):]
        self.remote = "://" in output_path
        self.local = tempfile.mkdtemp(prefix="cloudml-output-") if self.remote else os.path.abspath(output_path)
        os.makedirs(self.local, exist_ok=True)

    def path(self, *parts: str) -> str:
        return os.path.join(self.local, *parts)

    def display(self, *parts: str) -> str:
        """Where `parts` ends up (the URI for a remote output path)."""
        return "/".join([self.uri.rstrip("/"), *parts]) if self.remote else self.path(*parts)

    def publish(self) -> None:
        if self.remote:
            import fsspec

            fs, root = fsspec.core.url_to_fs(self.uri)
            fs.put(self.local.rstrip("/") + "/", root, recursive=True)
            shutil.rmtree(self.local, ignore_errors=True)


def export(model: LinearModel, output: Output, version: int) -> str:
    """Writes the SavedModel to model/<version>, atomically (a TF Serving
    base path never shows a half-written version)."""
    base = output.path("model")
    os.makedirs(base, exist_ok=True)
    final = os.path.join(base, str(version))
    staging = tempfile.mkdtemp(prefix=f".{version}-tmp-", dir=base)
    tf.saved_model.save(model, staging, signatures={"serving_default": model.serve})
    if os.path.exists(final):  # a retried attempt replaces the previous export
        shutil.rmtree(final)
    os.rename(staging, final)
    return final


def train(args: argparse.Namespace) -> LinearModel:
    tf.random.set_seed(args.seed)
    x, y = generate_data(args.samples, args.noise, args.seed)
    model = LinearModel(x.mean(), x.std())
    optimizer = make_optimizer(args.optimizer, args.learning_rate)
    variables = [model.w, model.b]
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(args.samples, seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch_size)
    )

    @tf.function
    def train_step(batch_x, batch_y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(batch_x) - batch_y))
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss

    output = args.output
    tensorboard_dir = output.path("tensorboard")
    print(f"Use the optimizer: {args.optimizer}")
    print(f"Save tensorboard files into: {output.display('tensorboard')}")
    print(f"Run training with epoch number: {args.max_epochs}", flush=True)
    writer = tf.summary.create_file_writer(tensorboard_dir)
    started = time.monotonic()
    with writer.as_default():
        for epoch in range(args.max_epochs):
            total, batches = 0.0, 0
            for batch_x, batch_y in dataset:
                total += float(train_step(batch_x, batch_y))
                batches += 1
            loss = total / batches
            w, b = model.coefficients()
            summary_scalar("loss", loss, epoch)
            summary_scalar("w", w, epoch)
            summary_scalar("b", b, epoch)
            print(f"Epoch: {epoch}, loss: {loss}", flush=True)
            if np.isfinite(loss):
                report(step=epoch, loss=loss)
    writer.close()
    elapsed = datetime.timedelta(seconds=time.monotonic() - started)
    print(f"[{elapsed}] End of standalone training.")
    return model


def main(argv=None) -> int:
    args = parse_args(argv)
    args.output = Output(args.output_path)
    model = train(args)
    w, b = model.coefficients()
    print(f"Get the model, w: {w}, b: {b}")
    print(f"Exporting trained model to {args.output.display('model', str(args.model_version))}", flush=True)
    export(model, args.output, args.model_version)
    args.output.publish()
    print("Done exporting!", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
