"""A real Kubernetes API server for tests and benches, envtest-style.

`KubeEnv` starts its own etcd (loopback, its own data dir) and a real
`kube-apiserver` (built once by scripts/build_kube_apiserver.sh; see
shared KUBERNETES.md) with RBAC on and a static admin token, waits for
/readyz and writes an admin kubeconfig. There are no nodes and no kubelet:
tests play the kubelet's part the way kwok does, with the helpers here:

    env = KubeEnv(tmp_dir).start()
    env.create_namespace("ns")
    env.create_node("node-1", cpu="4", memory="16Gi", gpus=2)
    env.bind("ns", "pod-a", "node-1")                       # the scheduler's binding
    env.set_running("ns", "pod-a", pod_ip="10.0.0.5")      # status subresource
    env.set_succeeded("ns", "pod-a")
    env.set_failed("ns", "pod-b", exit_code=137, reason="OOMKilled")
    env.evict("ns", "pod-c")
    env.set_waiting("ns", "pod-d", "InvalidImageName", "...")   # a container that never starts
    env.finish_deletions("ns")   # what a kubelet does for Pods deleted with a grace period
    env.pod_logs[("ns", "pod-a")] = b"line\n"   # what pods/log answers (served at the Nodes' kubelet port)
    kubelet = Kubelet(env, "ns", "node-1").start()   # binds and runs every new Pod, confirms deletions
    env.stop()

Every helper is synchronous (tests call them from threads or directly).
What this cannot show: that Pods really run, pull images or reach each other.
"""
from __future__ import annotations

import http.server
import os
import re
import secrets
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

from deploy.local.etcd import EtcdProcess, free_port, open_log

#: A container image reference as the kubelet parses it (distribution's grammar):
#: the API server accepts any string without surrounding whitespace, the kubelet
#: answers InvalidImageName for the rest.
_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-*)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::[\w][\w.-]{{0,127}})?"
                             r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?", re.ASCII)

CACHE_BIN = os.environ.get("CLOUDML_KUBE_BIN",
                           os.path.join(os.environ.get("CLOUDML_KUBE_CACHE", "/var/cache/cloudml/kubernetes"), "bin"))


def find_binary(name: str) -> str:
    """kube-apiserver or kubectl from the build cache (or $PATH)."""
    path = os.path.join(CACHE_BIN, name)
    if os.access(path, os.X_OK):
        return path
    found = shutil.which(name)
    if found:
        return found
    raise FileNotFoundError(f"{name} not found in {CACHE_BIN}: run scripts/setup.sh "
                            "(scripts/build_kube_apiserver.sh builds it once, ~8 minutes)")


def unreachable_kubeconfig(path: str) -> str:
    """A kubeconfig naming an API server that is not there (a free loopback port)."""
    import json  # noqa: PLC0415

    with open(path, "w") as f:
        json.dump({"apiVersion": "v1", "kind": "Config", "current-context": "c",
                   "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{free_port()}",
                                                         "insecure-skip-tls-verify": True}}],
                   "users": [{"name": "u", "user": {"token": "x"}}],
                   "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}, f)
    return path


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _service_account_keys(directory: str) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = os.path.join(directory, "sa.key")
    public = os.path.join(directory, "sa.pub")
    with open(private, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    os.chmod(private, 0o600)
    with open(public, "wb") as f:
        f.write(key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _serving_cert(directory: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (the fake kubelet's)."""
    import datetime as dt  # noqa: PLC0415
    import ipaddress  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubelet")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "kubelet.crt"), os.path.join(directory, "kubelet.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return cert_path, key_path


class _LogHandler(http.server.BaseHTTPRequestHandler):
    """GET /containerLogs/<ns>/<pod>/<container>: the log the test set, whole."""

    def do_GET(self):  # noqa: N802 - http.server's name
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        body = self.server.logs.get(tuple(parts[1:3])) if len(parts) == 4 and parts[0] == "containerLogs" else None
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class KubeEnv:
    """etcd + kube-apiserver under `base_dir`, plus kwok-style kubelet helpers."""

    def __init__(self, base_dir: str):
        self.base_dir = os.path.abspath(base_dir)
        self.token = secrets.token_hex(16)
        self.port = 0
        self.etcd: EtcdProcess | None = None
        self.process: subprocess.Popen | None = None
        self.kubeconfig = os.path.join(self.base_dir, "kubeconfig")
        self._api = None
        #: (namespace, pod) -> bytes: what `pods/log` of that Pod answers
        self.pod_logs: dict[tuple[str, str], bytes] = {}
        self._kubelet: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0, attempts: int = 3) -> "KubeEnv":
        os.makedirs(self.base_dir, exist_ok=True)
        binary = find_binary("kube-apiserver")
        self.etcd = EtcdProcess(os.path.join(self.base_dir, "etcd"),
                                log_path=os.path.join(self.base_dir, "etcd.log")).start()
        private, public = _service_account_keys(self.base_dir)
        tokens = os.path.join(self.base_dir, "tokens.csv")
        with open(tokens, "w") as f:
            f.write(f"{self.token},admin,admin,system:masters\n")
        os.chmod(tokens, 0o600)
        last = ""
        for _ in range(attempts):
            self.port = free_port()
            log = open_log(os.path.join(self.base_dir, "kube-apiserver.log"))
            self.process = subprocess.Popen([
                binary, f"--etcd-servers=http://{self.etcd.endpoint}",
                f"--secure-port={self.port}", "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                f"--cert-dir={os.path.join(self.base_dir, 'certs')}", f"--token-auth-file={tokens}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={public}", f"--service-account-signing-key-file={private}",
                "--service-cluster-ip-range=10.255.0.0/24", "--disable-admission-plugins=ServiceAccount",
                "--logtostderr=true", "--v=0",
            ], stdout=log, stderr=log, start_new_session=True)
            log.close()
            if self._wait_ready(timeout):
                self._write_kubeconfig()
                self._serve_logs()
                return self
            last = (f"exited with {self.process.poll()}" if self.process.poll() is not None
                    else f"not ready in {timeout:.0f} s")
            self._stop_apiserver()
        self.stop()
        raise RuntimeError(f"could not start kube-apiserver ({last}); see "
                           f"{os.path.join(self.base_dir, 'kube-apiserver.log')}")

    def _wait_ready(self, timeout: float) -> bool:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            request = urllib.request.Request(f"{self.url}/readyz",
                                             headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    if response.status == 200:
                        return True
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        return False

    def _write_kubeconfig(self) -> None:
        self.write_kubeconfig(self.kubeconfig, self.token)

    def write_kubeconfig(self, path: str, token: str) -> str:
        """A kubeconfig for this API server that authenticates with `token`."""
        import json  # noqa: PLC0415 - YAML is a superset of JSON

        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "envtest",
            # The API server's self-signed certificate (with the CA that signed it) from --cert-dir.
            "clusters": [{"name": "envtest", "cluster": {
                "server": self.url, "certificate-authority": os.path.join(self.base_dir, "certs", "apiserver.crt")}}],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "user"}}],
        }
        with open(path, "w") as f:
            json.dump(config, f, indent=1)
        os.chmod(path, 0o600)
        return path

    def service_account_token(self, namespace: str, name: str) -> str:
        """A token of ServiceAccount `name` (created if missing) from the
        TokenRequest API: exactly what its RBAC bindings grant."""
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        try:
            self.core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
        except ApiException as err:
            if err.status != 409:
                raise
        made = self.core.create_namespaced_service_account_token(
            name, namespace, {"spec": {"audiences": [], "expirationSeconds": 3600}})
        return made.status.token

    def _stop_apiserver(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:  # it waits for open watches to end: a test server need not
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _serve_logs(self) -> None:
        """The Nodes' kubelet endpoint (HTTPS on loopback), serving `pod_logs`:
        the API server proxies pods/log to it, as kwok's does."""
        cert, key = _serving_cert(self.base_dir)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LogHandler)
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.logs = self.pod_logs
        threading.Thread(target=server.serve_forever, name="envtest-kubelet", daemon=True).start()
        self._kubelet = server

    def stop(self) -> None:
        if self._kubelet is not None:
            self._kubelet.shutdown()
            self._kubelet.server_close()
            self._kubelet = None
        self._stop_apiserver()
        if self.etcd is not None:
            self.etcd.stop()
            self.etcd = None
        if self._api is not None:
            self._api.close()
            self._api = None

    # ------------------------------------------------------------------ clients
    def api_client(self):
        """A new `kubernetes.client.ApiClient` with the admin token."""
        from kubernetes import config  # noqa: PLC0415

        return config.new_client_from_config(config_file=self.kubeconfig)

    @property
    def core(self):
        """A CoreV1Api with the admin token (shared by the helpers)."""
        from kubernetes import client  # noqa: PLC0415

        if self._api is None:
            self._api = self.api_client()
        return client.CoreV1Api(self._api)

    # ------------------------------------------------------------------ objects
    def create_namespace(self, name: str) -> None:
        self.core.create_namespace({"metadata": {"name": name}})

    def create_node(self, name: str, *, cpu: str = "4", memory: str = "16Gi", gpus: int = 0,
                    pods: int = 110) -> None:
        """A Ready Node with that allocatable (and capacity)."""
        resources = {"cpu": cpu, "memory": memory, "pods": str(pods)}
        if gpus:
            resources["nvidia.com/gpu"] = str(gpus)
        self.core.create_node({"metadata": {"name": name, "labels": {"type": "kwok"}}})
        self.core.patch_node_status(name, {"status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "lastHeartbeatTime": _now(), "lastTransitionTime": _now()}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self._kubelet.server_address[1] if self._kubelet else 0}},
        }})

    def delete_node(self, name: str) -> None:
        self.core.delete_node(name)

    # ------------------------------------------------------------------ the kubelet's part
    def bind(self, namespace: str, pod: str, node: str) -> None:
        """What the scheduler does: the binding subresource."""
        body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        # The client cannot deserialize the Status this answers: skip it.
        self.core.create_namespaced_pod_binding(pod, namespace, body, _preload_content=False)

    def _containers(self, namespace: str, pod: str) -> list[str]:
        return [c.name for c in self.core.read_namespaced_pod(pod, namespace).spec.containers]

    def _patch_status(self, namespace: str, pod: str, status: dict) -> None:
        self.core.patch_namespaced_pod_status(pod, namespace, {"status": status})

    def set_running(self, namespace: str, pod: str, pod_ip: str = "10.1.0.1", ready: bool = True) -> None:
        """Running; Ready (its readiness probe passes) unless `ready` is False."""
        now = _now()
        self._patch_status(namespace, pod, {
            "phase": "Running", "podIP": pod_ip, "hostIP": "127.0.0.1", "startTime": now,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now}],
            "containerStatuses": [{"name": c, "ready": ready, "restartCount": 0, "image": "image",
                                   "imageID": "", "state": {"running": {"startedAt": now}}}
                                  for c in self._containers(namespace, pod)],
        })

    def set_waiting(self, namespace: str, pod: str, reason: str, message: str = "") -> None:
        """Pending, its containers waiting (e.g. "InvalidImageName", "ImagePullBackOff")."""
        self._patch_status(namespace, pod, {
            "phase": "Pending",
            "containerStatuses": [{"name": c, "ready": False, "restartCount": 0, "image": "", "imageID": "",
                                   "state": {"waiting": {"reason": reason, "message": message}}}
                                  for c in self._containers(namespace, pod)],
        })

    def _terminate(self, namespace: str, pod: str, phase: str, exit_code: int, reason: str,
                   pod_reason: str = "", message: str = "") -> None:
        now = _now()
        status = {
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": now}],
            "containerStatuses": [{"name": c, "ready": False, "restartCount": 0, "image": "image", "imageID": "",
                                   "state": {"terminated": {"exitCode": exit_code, "reason": reason,
                                                            "startedAt": now, "finishedAt": now}}}
                                  for c in self._containers(namespace, pod)],
        }
        if pod_reason:
            status.update(reason=pod_reason, message=message)
        self._patch_status(namespace, pod, status)

    def set_succeeded(self, namespace: str, pod: str) -> None:
        self._terminate(namespace, pod, "Succeeded", 0, "Completed")

    def set_failed(self, namespace: str, pod: str, exit_code: int = 1, reason: str = "Error") -> None:
        """Failed with the container's exit code and reason (137 + "OOMKilled" for an OOM kill)."""
        self._terminate(namespace, pod, "Failed", exit_code, reason)

    def evict(self, namespace: str, pod: str, message: str = "The node was low on resource: memory.") -> None:
        """What the kubelet writes for a Pod it evicts under node pressure."""
        self._terminate(namespace, pod, "Failed", 137, "Error", pod_reason="Evicted", message=message)

    def finish_deletions(self, namespace: str) -> list[str]:
        """The kubelet's side of a graceful delete: every Pod of the namespace
        marked for deletion is removed now (grace 0). Returns their names."""
        done = []
        for pod in self.core.list_namespaced_pod(namespace).items:
            if pod.metadata.deletion_timestamp is not None:
                from kubernetes.client.exceptions import ApiException  # noqa: PLC0415
                try:
                    self.core.delete_namespaced_pod(pod.metadata.name, namespace, grace_period_seconds=0)
                except ApiException as err:
                    if err.status != 404:
                        raise
                done.append(pod.metadata.name)
        return done



class Kubelet(threading.Thread):
    """A kubelet of one Node for one namespace, kwok-style: binds every new
    Pod to `node` and marks it Running (and Ready), or waiting with
    InvalidImageName when an image is not a valid reference (as a kubelet
    does before any pull); finishes graceful deletions. `halt()` stops it."""

    def __init__(self, env: KubeEnv, namespace: str, node: str, interval: float = 0.1):
        super().__init__(daemon=True, name=f"kubelet-{node}")
        self.env, self.namespace, self.node, self.interval = env, namespace, node, interval
        self._halt = threading.Event()

    def start(self) -> "Kubelet":
        super().start()
        return self

    def halt(self) -> None:
        self._halt.set()
        self.join(5)

    def run(self) -> None:
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        while not self._halt.wait(self.interval):
            try:
                for pod in self.env.core.list_namespaced_pod(self.namespace).items:
                    if pod.metadata.deletion_timestamp is None and not pod.spec.node_name:
                        self.env.bind(self.namespace, pod.metadata.name, self.node)
                        bad = next((c.image for c in pod.spec.containers
                                    if not IMAGE_REFERENCE.fullmatch(c.image) or len(c.image) > 255), None)
                        if bad is None:
                            self.env.set_running(self.namespace, pod.metadata.name)
                        else:  # the kubelet's message
                            self.env.set_waiting(self.namespace, pod.metadata.name, "InvalidImageName",
                                                 f'Failed to apply default image tag "{bad}": couldn\'t parse '
                                                 f'image reference "{bad}": invalid reference format')
                self.env.finish_deletions(self.namespace)
            except ApiException:  # a Pod deleted meanwhile: look again
                continue
            except Exception:  # noqa: BLE001 - the API server stopped under it (end of a test)
                if self._halt.is_set():
                    return
