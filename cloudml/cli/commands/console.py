"""cloudml console: a one-time login link to the web console.

    cloudml console            # prints http://HOST:8501/login?code=... (works once, within a minute)
    cloudml console -o json    # {"login_link": ...}

The console is served by the gateway on its HTTP port at /ui/. The link logs
the browser in as the current credentials' access key (an HttpOnly cookie,
one hour); its address bar then shows /ui/, with no code or token in it.
One may also open /ui/ and log in with an access key and secret.
"""
from __future__ import annotations

from cloudml.cli.base import Context, add_command

#: the console's path on the gateway's HTTP port (services/auth/login.py CONSOLE_PATH)
CONSOLE_PATH = "/ui/"


def register(subparsers) -> None:
    add_command(subparsers, "console", console, "Print a one-time login link to the web console")


def console(ctx: Context) -> None:
    link = ctx.client.login_link(CONSOLE_PATH)
    ctx.emit({"login_link": link}, text=link)
