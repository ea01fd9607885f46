"""The CLI's command groups, one module each.

Each module has `register(subparsers)`, which adds its group (or a single
command) with `cloudml.cli.base.add_group` / `add_command`. `GROUPS` lists
them in the order `cloudml --help` shows; a new group (`jobs`, `models`,
`hp`) is a new module here plus its name in `GROUPS`.
"""

GROUPS = (
    "configure",
    "auth",
    "tenants",
    "keys",
    "quota",
    "jobs",
    "models",
    "hp",
    "tensorboard",
    "dev",
    "console",
)
