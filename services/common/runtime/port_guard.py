"""The loopback ports of a local job's training cluster, kept to its tenant.

Why: a distributed job's replicas listen on the TCP ports TF_CONFIG names
(the gRPC server of TensorFlow's distributed runtime: MultiWorkerMirrored-
and ParameterServerStrategy, `tf.distribute.Server`, Estimator's). That
server authenticates no one and runs whatever graph it is sent, as the user
it runs as, on every interface: any other tenant's process on the machine
could connect and read or write the job's tenant's files (a `ReadFile` op on
the job's own worker), or listen on a port first and receive the job's
tensors. Tenant users keep files apart; ports need the kernel's firewall.

What (nftables, one table per runtime, `apply` replaces it whole in one
atomic transaction, so a restart or a crash leaves no stale rule behind):

- a connection to a guarded port may be opened only by a socket of the
  port's tenant (anyone else's SYN is answered with a reset);
- only a socket of that tenant may accept on it (a SYN-ACK from anyone
  else's listener is dropped), so no one can take a port between its choice
  and the replica's bind;
- nothing from outside the machine reaches it (any interface but loopback).

Packets the kernel sends for no socket (a reset for a closed port) are left
alone. Without nftables (or without CAP_NET_ADMIN) no port can be guarded:
the local runtime then refuses to give a job cluster ports while tenant
isolation is on (`IsolationUnavailable`: the job fails, StartFailed, saying
so), unless its operator sets CLOUDML_UNGUARDED_CLUSTER_PORTS=1 and accepts
the exposure.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from typing import Mapping

NFT = shutil.which("nft") or "/usr/sbin/nft"
TABLE_PREFIX = "cloudml_"
NFT_TIMEOUT = 10.0  # seconds; nft answers in ~15 ms


class IsolationUnavailable(RuntimeError):
    """The ports cannot be kept to their tenant here."""


def ruleset(table: str, grants: Mapping[int, int]) -> str:
    """The nft script that makes `table` guard exactly `grants` (port -> uid)."""
    head = f"add table inet {table}\ndelete table inet {table}\n"
    if not grants:
        return head  # nothing to guard: no table at all
    ports = ", ".join(str(int(p)) for p in sorted(grants))
    allowed = ", ".join(f"{int(p)} . {int(uid)}" for p, uid in sorted(grants.items()))
    new = "tcp flags & (fin|syn|rst|ack) == syn"
    accepted = "tcp flags & (fin|syn|rst|ack) == syn|ack"
    return head + f"""table inet {table} {{
  set ports {{ typeof tcp dport; elements = {{ {ports} }} }}
  set allowed {{ typeof tcp dport . meta skuid; elements = {{ {allowed} }} }}
  chain output {{
    type filter hook output priority 0; policy accept;
    {new} tcp dport @ports tcp dport . meta skuid != @allowed counter reject with tcp reset
    {accepted} tcp sport @ports tcp sport . meta skuid != @allowed counter drop
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname != "lo" tcp dport @ports counter drop
  }}
}}
"""


class PortGuard:
    """The nftables table `table` (one per runtime state directory)."""

    def __init__(self, table: str, nft: str = NFT):
        self.table = table
        self.nft = nft

    def elsewhere(self) -> set[int]:
        """Ports that another runtime's table guards (another platform on this
        machine, or one that died with jobs running): never handed out here,
        since only that table's user could listen on them."""
        try:
            done = subprocess.run([self.nft, "-j", "list", "sets", "inet"], capture_output=True, text=True,
                                  timeout=NFT_TIMEOUT)
            listed = json.loads(done.stdout) if done.returncode == 0 else {}
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return set()
        ports = set()
        for item in listed.get("nftables", ()):
            found = item.get("set") or {}
            if (found.get("name") == "ports" and str(found.get("table", "")).startswith(TABLE_PREFIX)
                    and found.get("table") != self.table):
                ports.update(p for p in found.get("elem", ()) if isinstance(p, int))
        return ports

    def apply(self, grants: Mapping[int, int]) -> None:
        """Guards exactly `grants` (port -> the uid that may use it), at once."""
        try:
            done = subprocess.run([self.nft, "-f", "-"], input=ruleset(self.table, grants), capture_output=True,
                                  text=True, timeout=NFT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise IsolationUnavailable(f"nft did not answer within {NFT_TIMEOUT:g} s") from None
        except FileNotFoundError:
            raise IsolationUnavailable(
                "tenant isolation keeps a job's cluster ports to its tenant with nftables, which is not "
                "installed: apt-get install -y nftables (or CLOUDML_UNGUARDED_CLUSTER_PORTS=1 on the jobs "
                "service to run jobs with their ports open to every user of the machine)") from None
        if done.returncode != 0:
            raise IsolationUnavailable(f"nft refused the job port rules: {done.stderr.strip()[-500:]} "
                                       "(or CLOUDML_UNGUARDED_CLUSTER_PORTS=1 on the jobs service to run jobs "
                                       "with their ports open to every user of the machine)")
