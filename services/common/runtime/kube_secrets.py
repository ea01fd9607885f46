"""Replicas' Secrets for the kubernetes runtime (a mixin of
`KubernetesRuntime`): a request with `secret_env` gets a Secret of its own
(`kube_objects.secret_name` of its replica id), owned by its group's
Service, made before the Pod (which refers to it by `secretKeyRef`) and
deleted by `forget()`, even once the Pod is gone (the garbage collector
removes it with the Service otherwise, e.g. a Pod gone while no service
ran). Uses the runtime's `_call`, `_lock`, `_secrets`, `core` and
`namespace`."""
from __future__ import annotations

from services.common.runtime.base import ReplicaRequest
from services.common.runtime.kube_objects import PREFIX, REQUEST_TIMEOUT, api_error, secret_body, secret_name


class PodSecrets:
    async def _make_secret(self, request: ReplicaRequest, svc: str, svc_uid: str) -> None:
        """Creates the replica's Secret (again, if one of that name is left from before)."""
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        body = secret_body(request, svc, svc_uid)
        with self._lock:
            self._secrets.add(request.replica_id)
        for attempt in range(2):
            try:
                await self._call(self.core.create_namespaced_secret, self.namespace, body,
                                 _request_timeout=REQUEST_TIMEOUT)
                return
            except ApiException as err:
                if err.status != 409 or attempt:
                    raise api_error(f"cannot create the Secret of {request.replica_id}", err) from None
            await self._delete_secret(body["metadata"]["name"])

    async def _delete_secret(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        try:
            await self._call(self.core.delete_namespaced_secret, name, self.namespace,
                             _request_timeout=REQUEST_TIMEOUT, _preload_content=False)
        except ApiException as err:
            if err.status != 404:
                raise api_error(f"cannot delete Secret {name}", err) from None

    def _remember_secret(self, pod) -> None:
        """adopt(): a Pod that refers to its replica's Secret (under the lock)."""
        rid = (pod.metadata.annotations or {}).get(PREFIX + "replica-id")
        if rid and (pod.metadata.annotations or {}).get(PREFIX + "secret"):
            self._secrets.add(rid)

    async def _forget_secret(self, replica_id: str) -> None:
        """Deletes the replica's Secret if it has one."""
        with self._lock:
            known = replica_id in self._secrets
        if known:
            await self._delete_secret(secret_name(replica_id))
            with self._lock:
                self._secrets.discard(replica_id)
