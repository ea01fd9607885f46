"""A dev environment's replica: JupyterLab on a Unix socket (or TCP in a Pod), under
`--base-url /dev/<tenant>/<name>/`, with the tenant's storage as its root.

Started by the jobs service (`services.jobs.devenvs`) through the runtime,
as the tenant's own unprivileged user; on `local` it opens no TCP port, and
neither do its kernels (ZeroMQ over Unix sockets beside the server's). Only
the platform (the gateway, as the platform's user) reaches the socket, in
the tenant's 0700 directory, and it presents Jupyter's token, which this
process takes from CLOUDML_JUPYTER_TOKEN and removes from its environment before
anything starts (kernels never inherit it, and it never appears on a
command line). What stays in the environment is for the kernels:
CLOUDML_CONFIG (an access key of the tenant), PATH with the platform's
Python (SDK, TensorFlow, the `cloudml` CLI).

The gateway already decides who may reach the page (its login cookie,
SameSite=Strict), drops cookies and Host on the way and presents the token:
so the server accepts any Origin (browsers see the gateway's) and needs no
XSRF cookie of its own. Nothing is fetched at run time: no update check,
no news, a read-only extension manager.

On `kubernetes` (`--listen 0.0.0.0:PORT`, services.jobs.devenv_kube) it is
a Pod's process on TCP: any Pod of the cluster can connect, so the token
(from the replica's own Secret) is what keeps everyone but the gateway out;
the kernels' access key comes as CLOUDML_ACCESS_KEY/CLOUDML_SECRET_KEY.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys


def kernel_ipc_prefix(socket: str) -> str:
    """Where the server's kernels put their channels' sockets (`<this>-N`):
    beside `socket`, under a short name (a Unix socket's path is at most 107
    bytes; `socket` may take ~102 of them)."""
    return os.path.join(os.path.dirname(socket), "k-" + hashlib.sha256(os.path.basename(socket).encode()).hexdigest()[:8])


def jupyter_argv(socket: str, base_url: str, root_dir: str, token: str, listen: str = "") -> list[str]:
    """Jupyter's arguments: on the Unix socket `socket`, or on TCP `listen` (HOST:PORT)."""
    if listen:
        host, _, port = listen.rpartition(":")
        where = [f"--ServerApp.ip={host}", f"--ServerApp.port={int(port)}", "--ServerApp.port_retries=0"]
    else:
        # Its kernels too talk over Unix sockets beside it (ZeroMQ's ipc, in the
        # tenant's 0700 directory): over TCP (the default) any user of the
        # machine could subscribe to a kernel's iopub port and read every output
        # of the tenant's notebooks (the shell and control channels want the
        # connection file's key; iopub publishes to anyone). In a Pod, TCP on
        # 127.0.0.1 is the Pod's own.
        where = [f"--ServerApp.sock={socket}", "--ServerApp.sock_mode=0600",
                 "--KernelManager.transport=ipc", f"--KernelManager.ip={kernel_ipc_prefix(socket)}"]
    return [
        *where, f"--ServerApp.base_url={base_url}", f"--ServerApp.root_dir={root_dir}",
        f"--IdentityProvider.token={token}", "--ServerApp.password=",
        "--ServerApp.allow_origin=*", "--ServerApp.allow_remote_access=True",
        "--ServerApp.disable_check_xsrf=True", "--ServerApp.open_browser=False",
        # Isolation runs it as the tenant's user; without root there is no other user to be.
        "--ServerApp.allow_root=True", "--ServerApp.quit_button=False",
        "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        # No language servers are installed, and no classic-notebook extensions: ~20 % of the start's CPU.
        '--ServerApp.jpserver_extensions={"jupyter_lsp":False,"notebook_shim":False}',
    ]


def without_token_in_pages(lab_app) -> None:
    """Stock JupyterLab writes the server's token into every page's config
    for its frontend to send back; here the gateway sends it instead, so the
    pages carry none. (Patched on the class: the server loads the
    `jupyterlab` extension by its own name, not through a subclass.)"""
    original = lab_app.initialize_handlers

    def initialize_handlers(self):
        original(self)
        settings = self.serverapp.web_app.settings
        settings.setdefault("page_config_data", {})["token"] = ""
        settings["page_config_hook"] = lambda handler, page_config: {**page_config, "token": ""}

    lab_app.initialize_handlers = initialize_handlers


def quiet_news(settings_dir: str) -> None:
    """The tenant's JupyterLab settings, unless they chose otherwise: no
    prompt about fetching Jupyter's news (there is nothing to fetch from)."""
    path = os.path.join(settings_dir, "@jupyterlab", "apputils-extension", "notification.jupyterlab-settings")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write('{"fetchNews": "false", "checkForUpdates": false}\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.jobs.devenv_replica")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="the Unix socket to listen on (the local runtime)")
    where.add_argument("--listen", help="HOST:PORT to listen on (a Pod on the kubernetes runtime)")
    parser.add_argument("--base-url", required=True, help="e.g. /dev/<tenant>/<name>/")
    parser.add_argument("--root-dir", required=True, help="the notebooks' directory (the tenant's storage)")
    args = parser.parse_args(argv)
    token = os.environ.pop("CLOUDML_JUPYTER_TOKEN", "")
    if len(token) < 32:
        print("error: CLOUDML_JUPYTER_TOKEN must hold the server's token", file=sys.stderr)
        return 2
    if args.listen and not args.listen.rpartition(":")[2].isdigit():
        print("error: --listen takes HOST:PORT", file=sys.stderr)
        return 2
    if args.socket and os.path.exists(args.socket):
        os.unlink(args.socket)
    os.chdir(args.root_dir)
    home = os.environ.get("HOME", args.root_dir)
    os.environ.setdefault("JUPYTER_DATA_DIR", os.path.join(home, ".jupyter-data"))
    os.environ.setdefault("JUPYTER_CONFIG_DIR", os.path.join(home, ".jupyter"))
    os.environ.setdefault("JUPYTER_RUNTIME_DIR", os.path.join(home, ".jupyter-runtime"))
    os.environ.setdefault("IPYTHONDIR", os.path.join(home, ".ipython"))
    os.environ.setdefault("JUPYTERLAB_SETTINGS_DIR", os.path.join(home, ".jupyter", "lab", "user-settings"))
    os.environ.setdefault("JUPYTERLAB_WORKSPACES_DIR", os.path.join(home, ".jupyter", "lab", "workspaces"))
    from jupyterlab.labapp import LabApp

    quiet_news(os.environ["JUPYTERLAB_SETTINGS_DIR"])
    without_token_in_pages(LabApp)
    where = f"http://{args.listen}" if args.listen else f"unix:{args.socket}"
    print(f"JupyterLab on {where} under {args.base_url}", flush=True)
    LabApp.launch_instance(argv=jupyter_argv(args.socket, args.base_url, args.root_dir, token, args.listen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
