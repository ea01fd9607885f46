"""cloudml keys: a tenant's access keys."""
from __future__ import annotations

from cloudml.auth.v1 import auth_service_pb2 as pb
from cloudml.cli.base import Context, add_command, add_group, enum_label, format_time, message_to_dict

HEADERS = ["ACCESS_KEY_ID", "TENANT", "ROLE", "STATUS", "DESCRIPTION", "CREATED"]
TENANT_HELP = "the tenant (default: your own)"


def register(subparsers) -> None:
    keys = add_group(subparsers, "keys", "Access keys")
    p = add_command(keys, "create", create, "Create an access key; its secret is shown only once")
    p.add_argument("--tenant", help=TENANT_HELP)
    p.add_argument("--description", default="", help="free text to tell keys apart ('ci', 'laptop')")
    p = add_command(keys, "list", list_, "List a tenant's access keys (revoked ones too)", aliases=["ls"])
    p.add_argument("--tenant", help=TENANT_HELP)
    p = add_command(keys, "revoke", revoke, "Revoke an access key: it can no longer get tokens")
    p.add_argument("access_key_id", metavar="ACCESS_KEY_ID")
    p.add_argument("--tenant", help=TENANT_HELP)


def _row(k) -> list:
    return [k.access_key_id, k.tenant, enum_label(pb.Role, k.role, "ROLE_"),
            "revoked" if k.revoked else "active", k.description, format_time(k.create_time)]


def create(ctx: Context) -> None:
    resp = ctx.client.create_access_key(ctx.args.tenant, ctx.args.description)
    k = resp.access_key
    ctx.emit(message_to_dict(resp), table=(
        ["ACCESS_KEY_ID", "SECRET_KEY", "TENANT", "ROLE", "DESCRIPTION"],
        [[k.access_key_id, resp.secret_key, k.tenant, enum_label(pb.Role, k.role, "ROLE_"), k.description]],
    ))
    if not ctx.json:
        ctx.note("Save the secret key now: it cannot be shown again.")


def list_(ctx: Context) -> None:
    keys = ctx.client.list_access_keys(ctx.args.tenant)
    ctx.emit([message_to_dict(k) for k in keys], table=(HEADERS, [_row(k) for k in keys]))


def revoke(ctx: Context) -> None:
    k = ctx.client.revoke_access_key(ctx.args.access_key_id, ctx.args.tenant)
    ctx.emit(message_to_dict(k), table=(HEADERS, [_row(k)]))
