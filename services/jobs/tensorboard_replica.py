"""A TensorBoard replica: the real `tensorboard` package serving one logdir
on a Unix socket, under `--path-prefix /tensorboard/<tenant>/<name>`.

Started by the jobs service (`services.jobs.tensorboards`) through the
runtime, as the tenant's own unprivileged user, so it reads nothing but what
that user may read. It opens no TCP port: only the platform (the gateway, as
the platform's user) reaches the socket, in the tenant's 0700 directory.

TensorFlow is kept out (`tensorboard.compat.notf`, the marker TensorBoard's
own TF-free builds use): TensorBoard then reads event files with its own
stub, which handles the local files a TensorBoard here may name, and the
replica starts in about a second with ~100 MB instead of TensorFlow's ~6 s
and ~570 MB. `--load_fast=false`: no separate Rust data server process.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import types


def _without_tensorflow() -> None:
    sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.jobs.tensorboard_replica")
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--logdir")
    where.add_argument("--logdir-spec", help="name:path,name:path (one run per directory)")
    parser.add_argument("--path-prefix", required=True, help="e.g. /tensorboard/<tenant>/<name>")
    parser.add_argument("--reload-interval", default="5")
    args = parser.parse_args(argv)

    _without_tensorflow()
    from tensorboard import default, program
    from werkzeug import serving

    class UnixSocketServer(program.TensorBoardServer):
        """TensorBoard's WSGI app on a Unix socket (werkzeug's `unix://`)."""

        def __init__(self, wsgi_app, flags):
            with_socket = args.socket
            if os.path.exists(with_socket):
                os.unlink(with_socket)
            self._server = serving.make_server(f"unix://{with_socket}", 0, wsgi_app, threaded=True)
            os.chmod(with_socket, 0o600)

        def serve_forever(self):
            self._server.serve_forever()

        def get_url(self):
            return f"http+unix://{args.socket}{args.path_prefix}/"

        def print_serving_message(self):
            print(f"TensorBoard on unix:{args.socket} under {args.path_prefix}/", flush=True)

    board = program.TensorBoard(default.get_plugins(), server_class=UnixSocketServer)
    logdir = ["--logdir", args.logdir] if args.logdir else ["--logdir_spec", args.logdir_spec]
    board.configure(argv=["tensorboard", *logdir, "--path_prefix", args.path_prefix,
                          "--load_fast", "false", "--reload_interval", args.reload_interval])
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # Not board.main(): it writes a TensorBoardInfo file meant for `tensorboard`'s
    # own discovery (notebooks), which a managed replica has no use for.
    server = board._make_server()
    server.print_serving_message()
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
