"""Where the SDK and the CLI find the platform and the caller's access key.

Each setting is resolved on its own, first match wins:

1. an explicit argument (`Client(endpoint=...)`, the CLI's flags);
2. the environment: CLOUDML_ENDPOINT, CLOUDML_ACCESS_KEY, CLOUDML_SECRET_KEY
   (and CLOUDML_REST_ENDPOINT);
3. the config file that `cloudml configure` writes: $CLOUDML_CONFIG, else
   ~/.config/cloudml/config.json (honouring $XDG_CONFIG_HOME). It holds the
   same JSON keys as the platform's `DIR/credentials.json`:
   {"endpoint", "rest_endpoint", "access_key", "secret_key"}, mode 0600.
   Named profiles live beside them, under "profiles": {"team-a": {...}};
   a profile is chosen with `profile=` (the CLI's --profile) or
   $CLOUDML_PROFILE, and the top-level settings are the default profile.

The endpoint falls back to the local platform's gateway, 127.0.0.1:8500.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass

from cloudml.errors import ConfigurationError

DEFAULT_ENDPOINT = "127.0.0.1:8500"
DEFAULT_REST_ENDPOINT = "http://127.0.0.1:8501"
FIELDS = ("endpoint", "rest_endpoint", "access_key", "secret_key")
ENV = {
    "endpoint": "CLOUDML_ENDPOINT",
    "rest_endpoint": "CLOUDML_REST_ENDPOINT",
    "access_key": "CLOUDML_ACCESS_KEY",
    "secret_key": "CLOUDML_SECRET_KEY",
}


@dataclass
class Credentials:
    endpoint: str = ""
    rest_endpoint: str = ""
    access_key: str = ""
    secret_key: str = ""
    # Where each setting came from, for error messages ("argument", "env", path).
    source: str = ""

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("source")
        return {k: v for k, v in data.items() if v}


def default_config_path() -> str:
    explicit = os.environ.get("CLOUDML_CONFIG")
    if explicit:
        return os.path.expanduser(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "cloudml", "config.json")


_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def check_profile(name: str) -> str:
    """A profile name (letters, digits, '_', '.', '-'); ConfigurationError otherwise."""
    if not _PROFILE_NAME.fullmatch(name or ""):
        raise ConfigurationError(f"invalid profile name {name!r}: use letters, digits, '_', '.' and '-'")
    return name


def default_profile() -> str:
    """$CLOUDML_PROFILE, else "" (the file's top-level settings)."""
    return os.environ.get("CLOUDML_PROFILE", "").strip()


def _read_raw(path: str, missing_ok: bool) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise ConfigurationError(f"config file {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise ConfigurationError(f"cannot read config file {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"config file {path} is not a JSON object")
    return data


def list_profiles(path: str | None = None) -> list[str]:
    """The named profiles in the config file."""
    profiles = _read_raw(path or default_config_path(), True).get("profiles")
    return sorted(profiles) if isinstance(profiles, dict) else []


def read_config(path: str | None = None, *, missing_ok: bool = True, profile: str = "") -> dict:
    """The config file's settings of `profile` ("" = the default, top-level
    ones); {} when the file does not exist and missing_ok. A named profile
    that does not exist is a ConfigurationError."""
    path = path or default_config_path()
    data = _read_raw(path, missing_ok)
    if profile:
        profiles = data.get("profiles") if isinstance(data.get("profiles"), dict) else {}
        if profile not in profiles or not isinstance(profiles[profile], dict):
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigurationError(f"no profile {profile!r} in {path} (profiles: {known}); create it with "
                                     f"`cloudml configure --profile {profile} --access-key ... --secret-key ...`")
        data = profiles[profile]
    return {k: str(data[k]) for k in FIELDS if data.get(k)}


def write_config(settings: dict, path: str | None = None, *, profile: str = "") -> str:
    """Writes the settings of `profile` ("" = the top-level, default ones)
    atomically with mode 0600 (directory 0700), keeping the other profiles;
    returns the path."""
    path = path or default_config_path()
    section = {k: settings[k] for k in FIELDS if settings.get(k)}
    data = _read_raw(path, True)
    if profile:
        profiles = data.get("profiles") if isinstance(data.get("profiles"), dict) else {}
        profiles[check_profile(profile)] = section
        data["profiles"] = profiles
    else:
        data = {**section, **({"profiles": data["profiles"]} if isinstance(data.get("profiles"), dict) else {})}
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".json", dir=directory)  # created 0600
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as err:
        raise ConfigurationError(f"cannot write config file {path}: {err}") from None
    return path


def resolve(endpoint: str | None = None, access_key: str | None = None, secret_key: str | None = None,
            *, config_path: str | None = None, require_keys: bool = True, profile: str | None = None) -> Credentials:
    """Resolves each setting from arguments, then env, then the config file
    (its `profile`, default $CLOUDML_PROFILE, else the top-level settings).

    A profile named explicitly (argument or $CLOUDML_PROFILE) is read from
    the file and wins over CLOUDML_ENDPOINT/ACCESS_KEY/SECRET_KEY, since
    asking for a profile means "act as that one"."""
    explicit = {"endpoint": endpoint, "access_key": access_key, "secret_key": secret_key}
    path = config_path or default_config_path()
    profile = default_profile() if profile is None else profile
    if profile:
        check_profile(profile)
        chosen = read_config(path, profile=profile)
        label = f"{path} (profile {profile})"
        creds = Credentials(
            endpoint=explicit["endpoint"] or chosen.get("endpoint", DEFAULT_ENDPOINT),
            rest_endpoint=chosen.get("rest_endpoint", ""),
            access_key=explicit["access_key"] or chosen.get("access_key", ""),
            secret_key=explicit["secret_key"] or chosen.get("secret_key", ""),
            source=label,
        )
        if require_keys and not (creds.access_key and creds.secret_key):
            raise ConfigurationError(f"profile {profile!r} in {path} has no access key and secret key; run "
                                     f"`cloudml configure --profile {profile} --access-key ... --secret-key ...`")
        return creds
    file_settings: dict | None = None
    resolved: dict[str, str] = {}
    sources: dict[str, str] = {}
    for name in FIELDS:
        value = explicit.get(name)
        if value:
            resolved[name], sources[name] = value, "argument"
            continue
        value = os.environ.get(ENV[name], "").strip()
        if value:
            resolved[name], sources[name] = value, ENV[name]
            continue
        if file_settings is None:
            file_settings = read_config(path)
        if file_settings.get(name):
            resolved[name], sources[name] = file_settings[name], path
    creds = Credentials(
        endpoint=resolved.get("endpoint", DEFAULT_ENDPOINT),
        rest_endpoint=resolved.get("rest_endpoint", ""),
        access_key=resolved.get("access_key", ""),
        secret_key=resolved.get("secret_key", ""),
        source=", ".join(sorted(set(sources.values()))) or "defaults",
    )
    if require_keys:
        missing = [ENV[n] for n in ("access_key", "secret_key") if not getattr(creds, n)]
        if missing:
            raise ConfigurationError(
                f"no credentials: set {' and '.join(missing)}, or run `cloudml configure` "
                f"(config file {path})"
            )
    return creds
