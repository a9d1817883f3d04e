"""A real local Redis Cluster for tests: three redis-server processes on free
ports, joined with `redis-cli --cluster create` (no replicas). Nodes keep
serving their hash slots when another dies (cluster-require-full-coverage
no), so a test can kill one and see exactly the pages it held fail."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def make_certificates(directory: Path) -> Path:
    """A CA and a certificate for 127.0.0.1 signed by it (openssl), used by
    the nodes and by the client alike."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory, timeout=60)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
            "-subj", "/CN=umgr-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1")
    (directory / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "node.crt", "-days", "1", "-extfile", "ext")
    return directory


def free_ports(count: int) -> list[int]:
    """Ports whose cluster bus ports (+10000) are free too."""
    found = []
    while len(found) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 55000 and port not in found and _free(port + 10000):
            found.append(port)
    return found


class RedisCluster:
    def __init__(self, workdir: Path, nodes: int = 3, password: str = "", tls: Path | None = None):
        """tls: a make_certificates() directory: the nodes then speak TLS
        only (clients and the cluster bus), and want client certificates."""
        if not shutil.which("redis-server"):
            raise RuntimeError("redis-server is not installed (make deps installs it)")
        self.ports = free_ports(nodes)
        self.auth = ["-a", password, "--no-auth-warning"] if password else []
        secret = ["--requirepass", password, "--masterauth", password] if password else []
        files = ["--cacert", str(tls / "ca.crt"), "--cert", str(tls / "node.crt"), "--key", str(tls / "node.key")] \
            if tls else []
        self.auth += ["--tls", *files] if tls else []
        self.procs: dict[int, subprocess.Popen] = {}
        for port in self.ports:
            node_dir = workdir / f"redis-{port}"
            node_dir.mkdir()
            self.procs[port] = subprocess.Popen(
                ["redis-server", *(self._tls_options(tls, port) if tls else ["--port", str(port)]),
                 "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                 "--cluster-require-full-coverage", "no", "--save", "", "--appendonly", "no",
                 "--dir", str(node_dir), *secret],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for port in self.ports:
                self._wait(lambda: self.cli(port, "ping") == "PONG", f"node {port} to start")
            subprocess.run(["redis-cli", *self.auth, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, timeout=30)
            for port in self.ports:
                self._wait(lambda: "cluster_state:ok" in self.cli(port, "cluster", "info"), "the cluster")
        except BaseException:
            self.stop()
            raise

    @staticmethod
    def _tls_options(tls: Path, port: int) -> list[str]:
        return ["--port", "0", "--tls-port", str(port), "--tls-cluster", "yes", "--tls-replication", "yes",
                "--tls-cert-file", str(tls / "node.crt"), "--tls-key-file", str(tls / "node.key"),
                "--tls-ca-cert-file", str(tls / "ca.crt")]

    @property
    def port(self) -> int:
        return self.ports[0]

    def cli(self, port: int, *command: str) -> str:
        result = subprocess.run(["redis-cli", "-p", str(port), *self.auth, *command], capture_output=True, text=True, timeout=10)
        return result.stdout.strip()

    def keys(self, pattern: str = "*") -> int:
        return sum(int(self.cli(p, "eval", f"return #redis.call('keys', '{pattern}')", "0") or 0)
                   for p in self.ports if self.procs[p].poll() is None)

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait()

    @staticmethod
    def _wait(ready, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
