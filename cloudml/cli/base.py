"""What every command group shares: the parser class, how leaf commands are
declared, the per-invocation `Context` (lazy SDK client, output format) and
the two output forms (`-o table`, the default, and `-o json`).

A command group module (see `cloudml.cli.commands`) defines

    def register(subparsers) -> None:
        jobs = add_group(subparsers, "jobs", "Train jobs")
        p = add_command(jobs, "list", list_jobs, "List train jobs")
        p.add_argument("--tenant")

and each handler takes the `Context` and returns an exit code (None = 0):

    def list_jobs(ctx: Context) -> None:
        jobs = ctx.client.call(ctx.client.stub(JobsServiceStub).ListJobs, ...)
        ctx.emit([message_to_dict(j) for j in jobs],
                 table=(["NAME", "STATE"], [[j.name, j.state] for j in jobs]))

Handlers raise `cloudml.errors.CloudMLError` (the SDK does) or `UsageError`;
`cloudml.cli.main` prints them as one line and picks the exit code.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Sequence

OUTPUT_FORMATS = ("table", "json")


# The command line (or a spec file it names) is wrong in a way argparse
# cannot tell (exit 2). The SDK's spec builders raise the same class.
from cloudml.errors import SpecError as UsageError  # noqa: E402


class ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def add_output_option(parser: argparse.ArgumentParser, *, default=argparse.SUPPRESS) -> None:
    parser.add_argument(
        "-o", "--output", choices=OUTPUT_FORMATS, default=default,
        help="output format: a readable table (default) or JSON for machines",
    )


def add_profile_option(parser: argparse.ArgumentParser, *, default=argparse.SUPPRESS) -> None:
    parser.add_argument(
        "--profile", default=default, metavar="NAME",
        help="act with the credentials of this profile of the config file (`cloudml configure --profile NAME`; "
             "default $CLOUDML_PROFILE, else the file's default settings)",
    )


def add_group(subparsers, name: str, help: str, *, aliases: Sequence[str] = ()):
    """A command group (`cloudml NAME ...`); returns the subparsers to add its commands to."""
    parser = subparsers.add_parser(name, help=help, description=help, aliases=list(aliases))
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def add_command(subparsers, name: str, handler: Callable[["Context"], int | None], help: str,
                *, description: str | None = None, aliases: Sequence[str] = ()) -> argparse.ArgumentParser:
    """A leaf command that runs `handler(ctx)`; it accepts `-o json|table`."""
    parser = subparsers.add_parser(name, help=help, description=description or help, aliases=list(aliases))
    add_output_option(parser)
    add_profile_option(parser)
    parser.set_defaults(handler=handler)
    return parser


def arg_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse `type=` from a parser raising ValueError (its message kept)."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


class Context:
    """One CLI invocation: parsed arguments, the SDK client (made on first
    use, so commands that need none never import grpc), output helpers."""

    def __init__(self, args: argparse.Namespace, stdout=None, stderr=None):
        self.args = args
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self._client = None

    @property
    def output(self) -> str:
        return getattr(self.args, "output", None) or "table"

    @property
    def profile(self) -> str | None:
        """--profile, or None (then $CLOUDML_PROFILE, else the default settings)."""
        return getattr(self.args, "profile", None) or None

    @property
    def json(self) -> bool:
        return self.output == "json"

    @property
    def client(self):
        if self._client is None:
            from cloudml.client import Client

            self._client = Client(profile=self.profile)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    # --- output ----------------------------------------------------------------------

    def emit(self, data: Any, *, table: tuple[Sequence[str], Iterable[Sequence[Any]]] | None = None,
             fields: Sequence[tuple[str, Any]] | None = None, text: str | None = None) -> None:
        """Prints `data` as JSON with -o json; otherwise the table
        (headers, rows), the key/value `fields`, or `text`."""
        if self.json:
            print_json(data, self.stdout)
        elif table is not None:
            print_table(table[0], table[1], self.stdout)
        elif fields is not None:
            print_fields(fields, self.stdout)
        elif text is not None:
            self.stdout.write(text if text.endswith("\n") else text + "\n")
        else:
            print_json(data, self.stdout)

    def note(self, message: str) -> None:
        """A remark for people, on stderr (never mixed into -o json output)."""
        self.stderr.write(message.rstrip("\n") + "\n")


def message_to_dict(message) -> dict:
    """A protobuf message as JSON-ready data: proto field names, every field
    present (zeros and empty strings too, so the keys are stable), enums by
    name, int64 as strings and timestamps as RFC 3339 (proto3 JSON mapping)."""
    from google.protobuf import json_format

    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _in_field_order(message.DESCRIPTOR, data)


def _in_field_order(descriptor, data):
    """Keys in the order the .proto declares the fields (json_format puts
    fields left at their default last), so the output reads the same every time."""
    if not isinstance(data, dict) or descriptor.full_name.startswith("google.protobuf."):
        return data
    ordered = {}
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        sub = field.message_type
        if sub is not None and not sub.GetOptions().map_entry:
            value = [_in_field_order(sub, v) for v in value] if isinstance(value, list) else _in_field_order(sub, value)
        ordered[field.name] = value
    for key, value in data.items():  # anything unforeseen (extensions), kept at the end
        ordered.setdefault(key, value)
    return ordered


def print_json(data: Any, out) -> None:
    if hasattr(data, "DESCRIPTOR"):
        data = message_to_dict(data)
    out.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    return " ".join(str(value).split("\n"))


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], out) -> None:
    """Columns left-aligned, two spaces apart, headers in the first line."""
    body = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    for row in [list(headers)] + body:
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row))
        out.write(line.rstrip() + "\n")


def print_fields(fields: Sequence[tuple[str, Any]], out) -> None:
    """A single resource as aligned `Key: value` lines."""
    width = max((len(k) for k, _ in fields), default=0) + 1
    for key, value in fields:
        out.write(f"{(key + ':').ljust(width)}  {_cell(value)}\n")


def format_time(ts) -> str:
    """A protobuf Timestamp as "2025-01-31T12:00:00Z" ("-" when unset)."""
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return "-"
    return datetime.fromtimestamp(ts.seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def enum_label(enum_type, value: int, prefix: str) -> str:
    """ROLE_ADMIN -> "admin"."""
    try:
        name = enum_type.Name(value)
    except ValueError:
        return str(value)
    return name[len(prefix):].lower() if name.startswith(prefix) else name.lower()
