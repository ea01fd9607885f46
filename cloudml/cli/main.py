"""`cloudml`: the Cloud-ML command line.

    cloudml configure --from-file DATA_DIR/credentials.json
    cloudml tenants create team-a
    cloudml quota set --tenant team-a --cpu 8 --memory 16Gi
    cloudml keys create --tenant team-a -o json

Exit codes: 0 success; 1 the platform refused or could not be reached; 2 a
usage or configuration error; 130 interrupted. Errors are one line on stderr:
`error: <STATUS_CODE>: <message>` for the platform's answers, `error: <message>`
for what went wrong before (bad arguments, no credentials, no connection).
"""
from __future__ import annotations

import importlib
import os
import sys

from cloudml.cli.base import ArgumentParser, Context, UsageError, add_output_option, add_profile_option
from cloudml.cli.commands import GROUPS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> ArgumentParser:
    from cloudml import __version__

    parser = ArgumentParser(
        prog="cloudml",
        description="Cloud-ML: train, tune and serve TensorFlow models on a self-hosted platform.",
        epilog="Credentials: CLOUDML_ENDPOINT, CLOUDML_ACCESS_KEY, CLOUDML_SECRET_KEY, else the file "
               "`cloudml configure` writes ($CLOUDML_CONFIG or ~/.config/cloudml/config.json); "
               "--profile NAME (or $CLOUDML_PROFILE) picks one of its named profiles.",
    )
    parser.add_argument("--version", action="version", version=f"cloudml {__version__}")
    add_output_option(parser, default="table")
    add_profile_option(parser, default=None)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in GROUPS:
        importlib.import_module(f"cloudml.cli.commands.{name}").register(subparsers)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    if "grpc" not in sys.modules:
        # grpc's C core may log connection trouble on stderr; the CLI reports
        # it itself, in one line. (Not when embedded: the host owns the env.)
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx = Context(args)
    from cloudml import errors

    try:
        return args.handler(ctx) or EXIT_OK
    except UsageError as err:
        sys.stderr.write(f"error: {_one_line(err)}\n")
        return EXIT_USAGE
    except errors.ConfigurationError as err:
        sys.stderr.write(f"error: {_one_line(err.message)}\n")
        return EXIT_USAGE
    except errors.ConnectionFailed as err:
        sys.stderr.write(f"error: {_one_line(err.message)}\n")
        return EXIT_FAILED
    except errors.CloudMLError as err:
        sys.stderr.write(f"error: {err.code}: {_one_line(err.message)}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`cloudml tenants list | head -1`): not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    finally:
        try:
            ctx.close()
        except Exception:
            pass


if __name__ == "__main__":
    sys.exit(main())
