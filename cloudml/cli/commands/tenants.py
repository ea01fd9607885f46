"""cloudml tenants: create, list, describe, delete (admin)."""
from __future__ import annotations

from cloudml.cli.base import Context, add_command, add_group, format_time, message_to_dict

HEADERS = ["NAME", "DESCRIPTION", "CREATED"]


def register(subparsers) -> None:
    tenants = add_group(subparsers, "tenants", "Tenants (admin)")
    p = add_command(tenants, "create", create, "Create a tenant (admin only)")
    p.add_argument("name", metavar="NAME", help="a DNS label: lower-case letters, digits, '-'")
    p.add_argument("--description", default="", help="free text")
    add_command(tenants, "list", list_, "List the tenants you can see", aliases=["ls"])
    p = add_command(tenants, "describe", describe, "Show one tenant", aliases=["get"])
    p.add_argument("name", metavar="NAME")
    p = add_command(tenants, "delete", delete, "Delete a tenant and revoke its keys (admin only)")
    p.add_argument("name", metavar="NAME")


def _row(t) -> list:
    return [t.name, t.description, format_time(t.create_time)]


def create(ctx: Context) -> None:
    t = ctx.client.create_tenant(ctx.args.name, ctx.args.description)
    ctx.emit(message_to_dict(t), table=(HEADERS, [_row(t)]))


def list_(ctx: Context) -> None:
    tenants = list(ctx.client.list_tenants())
    ctx.emit([message_to_dict(t) for t in tenants], table=(HEADERS, [_row(t) for t in tenants]))


def describe(ctx: Context) -> None:
    t = ctx.client.get_tenant(ctx.args.name)
    quota = None
    if not ctx.json:
        quota = ctx.client.get_quota(t.name)
    fields = [("Name", t.name), ("Description", t.description), ("Created", format_time(t.create_time))]
    if quota is not None:
        from cloudml.cli.commands.quota import resource_summary

        fields += [("Quota", resource_summary(quota.limits)), ("Usage", resource_summary(quota.usage))]
    ctx.emit(message_to_dict(t), fields=fields)


def delete(ctx: Context) -> None:
    ctx.client.delete_tenant(ctx.args.name)
    ctx.emit({"name": ctx.args.name, "deleted": True}, text=f"deleted tenant {ctx.args.name}")
