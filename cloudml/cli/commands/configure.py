"""cloudml configure: where the platform is and which access key to use.

    cloudml configure --from-file ~/cloudml/credentials.json          # the admin (default settings)
    cloudml configure --profile team-a --access-key AK... --secret-key ...
    cloudml --profile team-a jobs list                                  # act as team-a

The key is checked at once (AuthService/WhoAmI through the endpoint): a
wrong key or an unreachable endpoint is reported and nothing is saved
(`--no-verify` saves without checking, e.g. before the platform is up).
"""
from __future__ import annotations

import getpass
import json
import sys

from cloudml import config
from cloudml.cli.base import Context, UsageError, add_command
from cloudml.errors import ConfigurationError


def register(subparsers) -> None:
    p = add_command(
        subparsers, "configure", configure, "Save the endpoint and access key the CLI and SDK use",
        description=(
            "Writes the config file ($CLOUDML_CONFIG, else ~/.config/cloudml/config.json; mode 0600). "
            "Options not given keep their saved values; with no option at all on a terminal, asks for each. "
            "CLOUDML_ENDPOINT / CLOUDML_ACCESS_KEY / CLOUDML_SECRET_KEY still take precedence over the file's "
            "default settings. --profile NAME saves a named profile instead (use it with --profile NAME on any "
            "command, or CLOUDML_PROFILE=NAME). The key is verified with the platform before it is saved."
        ),
    )
    p.add_argument("--no-verify", action="store_true",
                   help="save without checking the key with the platform (e.g. before it is up)")
    p.add_argument("--endpoint", help="gRPC endpoint host:port (the gateway; default 127.0.0.1:8500)")
    p.add_argument("--rest-endpoint", help="REST endpoint URL (default http://127.0.0.1:8501)")
    p.add_argument("--access-key", help="access key id (AK...)")
    p.add_argument("--secret-key", help="secret key (prefer --from-file or the prompt: arguments show in ps)")
    p.add_argument("--from-file", metavar="CREDENTIALS_JSON",
                   help="read the settings from a JSON file such as the platform's DATA_DIR/credentials.json")


def _prompt(settings: dict) -> dict:
    current = settings.get("endpoint") or config.DEFAULT_ENDPOINT
    answers = {}
    endpoint = input(f"Endpoint [{current}]: ").strip()
    answers["endpoint"] = endpoint or current
    key = input(f"Access key id [{settings.get('access_key', '')}]: ").strip()
    if key:
        answers["access_key"] = key
    secret = getpass.getpass("Secret key [keep]: " if settings.get("secret_key") else "Secret key: ").strip()
    if secret:
        answers["secret_key"] = secret
    return answers


def _verify(settings: dict):
    """WhoAmI with these settings (and nothing from the environment)."""
    from cloudml.client import Client

    with Client(settings.get("endpoint") or config.DEFAULT_ENDPOINT, settings["access_key"],
                settings["secret_key"], profile="", timeout=10) as client:
        return client.whoami()


def configure(ctx: Context) -> None:
    args = ctx.args
    path = config.default_config_path()
    profile = config.check_profile(args.profile) if getattr(args, "profile", None) else ""
    if not profile:
        settings = config.read_config(path)
    elif profile in config.list_profiles(path):
        settings = config.read_config(path, profile=profile)
    else:  # a new profile: on the same platform as the default settings, unless told otherwise
        defaults = config.read_config(path)
        settings = {k: defaults[k] for k in ("endpoint", "rest_endpoint") if defaults.get(k)}
    given: dict[str, str] = {}
    if args.from_file:
        try:
            with open(args.from_file) as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise ConfigurationError(f"cannot read {args.from_file}: {err}") from None
        if not isinstance(data, dict) or not any(data.get(k) for k in config.FIELDS):
            raise ConfigurationError(f"{args.from_file} has none of {', '.join(config.FIELDS)}")
        given.update({k: str(data[k]) for k in config.FIELDS if data.get(k)})
    flags = {"endpoint": args.endpoint, "rest_endpoint": args.rest_endpoint,
             "access_key": args.access_key, "secret_key": args.secret_key}
    given.update({k: v.strip() for k, v in flags.items() if v and v.strip()})
    if not given:
        if not sys.stdin.isatty():
            raise UsageError("nothing to configure: give --endpoint, --access-key, --secret-key or --from-file")
        given = _prompt(settings)
    settings.update(given)
    identity = None
    if not args.no_verify:
        if not (settings.get("access_key") and settings.get("secret_key")):
            ctx.note("note: not verified: an access key and a secret key are both needed")
        else:
            from cloudml import errors

            try:
                identity = _verify(settings)
            except errors.Unauthenticated as err:
                raise ConfigurationError(f"the platform at {settings.get('endpoint') or config.DEFAULT_ENDPOINT} "
                                         f"refused access key {settings['access_key']}: {err.message}; nothing "
                                         "was saved") from None
            except errors.CloudMLError as err:
                raise ConfigurationError(f"cannot verify the key: {err}; nothing was saved (--no-verify saves "
                                         "without checking)") from None
    written = config.write_config(settings, path, profile=profile)
    shown = {k: settings.get(k, "") for k in ("endpoint", "rest_endpoint", "access_key")}
    data = {"config_path": written, **shown}
    fields = [("Config file", written)]
    if profile:
        data["profile"] = profile
        fields.append(("Profile", profile))
    fields += [("Endpoint", shown["endpoint"] or f"{config.DEFAULT_ENDPOINT} (default)"),
               ("REST endpoint", shown["rest_endpoint"]), ("Access key", shown["access_key"]),
               ("Secret key", "(set)" if settings.get("secret_key") else "")]
    if identity is not None:
        from cloudml.auth.v1 import auth_service_pb2 as auth_pb
        from cloudml.cli.base import enum_label

        role = enum_label(auth_pb.Role, identity.role, "ROLE_")
        data.update(tenant=identity.tenant, role=role)
        fields += [("Verified", f"tenant {identity.tenant}, role {role}")]
    ctx.emit(data, fields=fields)
