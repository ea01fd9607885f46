"""cloudml auth: tokens and the caller's identity."""
from __future__ import annotations

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.cli.base import Context, add_command, add_group, enum_label, format_time, message_to_dict


def register(subparsers) -> None:
    auth = add_group(subparsers, "auth", "Tokens and identity")
    add_command(auth, "print-access-token", print_access_token,
                "Print a bearer token for the current credentials",
                description="Prints a bearer token (a JWT) for the current credentials, e.g. for "
                            "`curl -H \"Authorization: Bearer $(cloudml auth print-access-token)\"`.")
    add_command(auth, "whoami", whoami, "Show the caller's tenant, role and access key")


def print_access_token(ctx: Context) -> None:
    token = ctx.client.token()
    expires = ctx.client.token_expire_time
    ctx.emit({"token": token, "expire_time": expires.strftime("%Y-%m-%dT%H:%M:%SZ") if expires else ""}, text=token)


def whoami(ctx: Context) -> None:
    me = ctx.client.whoami()
    ctx.emit(message_to_dict(me), fields=[
        ("Tenant", me.tenant),
        ("Role", enum_label(pb.Role, me.role, "ROLE_")),
        ("Access key", me.access_key_id),
        ("Endpoint", ctx.client.endpoint),
        ("Token expires", format_time(me.expire_time)),
    ])
