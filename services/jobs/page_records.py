"""What the etcd records of page replicas (TensorBoards: services.jobs.tensorboards;
dev environments: services.jobs.devenv_records) share: the replica's runtime id,
its quota owner id, its page path and the JSON encoding."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import ClassVar


class PageRecord:
    """Mixed into a dataclass with `tenant`, `name` and `uid` fields."""

    #: prefix of the runtime's replica ids ("tensorboard.", "devenv.")
    RUNTIME_PREFIX: ClassVar[str]
    #: the quota owner's kind: jobs/<kind>/<name>/<uid>
    OWNER_KIND: ClassVar[str]
    #: the page's first path segment on the gateway: /<kind>/<tenant>/<name>/
    PAGE_KIND: ClassVar[str]

    @property
    def replica_id(self) -> str:
        return f"{self.RUNTIME_PREFIX}{self.tenant}.{self.name}.{self.uid}"

    @property
    def owner_id(self) -> str:
        return f"jobs/{self.OWNER_KIND}/{self.name}/{self.uid}"

    @property
    def path(self) -> str:
        return f"/{self.PAGE_KIND}/{self.tenant}/{self.name}/"

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes):
        """The record from its JSON; keys this version does not know are dropped."""
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
