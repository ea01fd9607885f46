"""Stand-ins shared by the tests of leader loops that place replicas
(test_tensorboards_core.py, test_model_exports_driver.py): the auth
service's quota and a clock the test moves."""
from __future__ import annotations

from services.common import errors


class Quota:
    """Reservations by (tenant, owner); over `cpu_limit` is RESOURCE_EXHAUSTED,
    and while `busy` every reservation is QuotaBusy (fits, not now)."""

    def __init__(self, cpu_limit: int = 4000):
        self.cpu_limit = cpu_limit
        self.held: dict[tuple[str, str], int] = {}
        self.busy = False

    async def reserve(self, tenant, owner, resources):
        if resources.cpu_millis > self.cpu_limit:
            raise errors.ResourceExhausted(f"cpu_millis: {resources.cpu_millis} over the limit {self.cpu_limit}")
        if self.busy:
            raise errors.QuotaBusy(f"cpu_millis: {resources.cpu_millis} more than the 0 free")
        self.held[(tenant, owner)] = resources.cpu_millis
        return True

    async def release(self, tenant, owner):
        return self.held.pop((tenant, owner), None) is not None


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now
