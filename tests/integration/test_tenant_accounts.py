"""Tenant accounts (services/common/tenancy.py) on this machine: created once
per tenant, from the platform's own id range, never the machine's people's."""
from __future__ import annotations

import grp
import subprocess
import uuid

from services.common.tenancy import ACCOUNT_ID_RANGE, Tenancy


def test_an_account_per_tenant_from_the_platforms_own_id_range():
    tenant = f"acct-{uuid.uuid4().hex[:8]}"
    tenancy = Tenancy(enabled=True)
    account = tenancy.account(tenant)
    try:
        low, high = ACCOUNT_ID_RANGE
        assert low <= account.uid <= high and low <= account.gid <= high, account
        assert grp.getgrgid(account.gid).gr_name == account.name
        # Another process (a fresh Tenancy) finds the same account instead of making one.
        assert Tenancy(enabled=True).account(tenant) == account
    finally:
        subprocess.run(["userdel", account.name], check=False)
