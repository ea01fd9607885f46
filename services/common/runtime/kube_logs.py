"""Following replicas' logs for the kubernetes runtime (a mixin of
`KubernetesRuntime`): while a Pod runs, a thread streams `pods/log` into
the replica's log path, so the platform's copy outlives the Pod. Uses the
runtime's `_acting`, `_lock`, `_logs`, `_pods`, `_closed`, `core` and
`namespace`."""
from __future__ import annotations

import logging
import os
import threading
import time

from services.common.runtime.kube_objects import CONTAINER, PREFIX, REQUEST_TIMEOUT

log = logging.getLogger(__name__)
#: A log follower gives up on a replica silent for this long (and reconnects).
LOG_READ_TIMEOUT = 24 * 3600.0


class PodLogs:
    def _follow_log(self, pod) -> None:
        """Best effort: follows a running Pod's log into its log path (once per Pod)."""
        name = pod.metadata.name
        path = (pod.metadata.annotations or {}).get(PREFIX + "log-path")
        if not self._acting or not path or (pod.status and pod.status.phase) != "Running":
            return
        with self._lock:
            if name in self._logs and self._logs[name].is_alive():
                return
            thread = threading.Thread(target=self._stream_log, args=(name, path), name=f"k8s-log-{name}",
                                      daemon=True)
            self._logs[name] = thread
        thread.start()

    def _stream_log(self, name: str, path: str) -> None:
        for _ in range(5):
            with self._lock:
                pod = self._pods.get(name)
            if pod is None or self._closed.is_set() or pod.status.phase != "Running":
                return
            try:  # what the file has (an earlier follower's, before a restart) is not asked for again
                since = int(time.time() - os.path.getmtime(path)) + 1 if os.path.getsize(path) else None
            except OSError:
                since = None
            try:
                response = self.core.read_namespaced_pod_log(
                    name, self.namespace, container=CONTAINER, follow=True, since_seconds=since,
                    _preload_content=False, _request_timeout=(REQUEST_TIMEOUT, LOG_READ_TIMEOUT))
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                with open(path, "ab") as out:
                    for chunk in response.stream(4096):
                        out.write(chunk)
                        out.flush()
                return
            except Exception as err:  # noqa: BLE001 - best effort (no kubelet, a restart of the node...)
                log.debug("cannot follow the log of Pod %s: %s", name, err)
                self._closed.wait(2.0)
