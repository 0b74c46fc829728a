"""A Flower deployment on this machine: one SuperLink and one SuperNode per client, on 127.0.0.1.

For the loopback rehearsal of a real deployment, the tests and the benchmark. Every process runs
the same commands docs/flower.md gives for real machines, on free ports, with a private FLWR_HOME
and Flower's phoning home turned off; `stop()` (or leaving the `with` block) kills every process
it started and everything they started (SuperExecs, ServerApps, ClientApps, site workers).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedsoda_cli.errors import FedsodaError
from fedsoda_cli.federated.flower.bundle import offline_env


@dataclass
class Site:
    client: int
    model_dir: Path
    shard: Path
    threads: int = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackFederation:
    """`with LoopbackFederation(sites) as fed:` -> fed.address is the SuperLink's host:port."""

    def __init__(self, sites: list[Site], folder: Path | None = None):
        self.sites = sites
        self.folder = Path(folder or tempfile.mkdtemp(prefix="fedsoda-loopback-"))
        self.home = self.folder / "flwr-home"
        self.address = ""
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[int, subprocess.Popen] = {}  # client -> its SuperNode

    def __enter__(self) -> LoopbackFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.superlink = self._spawn(
            "superlink",
            [
                "flower-superlink",
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
        )
        _wait_for_port(port, self.superlink, self.folder / "superlink.log")
        for site in self.sites:
            self.start_supernode(site)

    def start_supernode(self, site: Site) -> subprocess.Popen:
        config = (
            f'fedsoda-client={site.client} fedsoda-model="{site.model_dir}" fedsoda-shard="{site.shard}" '
            f'fedsoda-socket="{self.folder / f"site-{site.client}.sock"}" fedsoda-threads={site.threads}'
        )
        process = self._spawn(
            f"supernode-{site.client}",
            ["flower-supernode", "--insecure", "--superlink", self.address, "--port", str(free_port()), "--node-config", config],
        )
        self.supernodes[site.client] = process
        return process

    def kill_supernode(self, client: int) -> None:
        """SIGKILL a site: its SuperNode and everything in its process group (ClientApp, site worker)."""
        _kill_tree(self.supernodes.pop(client))

    def stop(self) -> None:
        for client in list(self.supernodes):
            self.kill_supernode(client)
        if self.superlink is not None:
            _kill_tree(self.superlink)
            self.superlink = None

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")
        with log:  # the child keeps its own descriptor
            return subprocess.Popen(
                command, env=offline_env(self.home), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )  # its own process group, so it can be stopped whole


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FedsodaError(f"flower-superlink exited with code {process.returncode}; see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise FedsodaError(f"flower-superlink did not listen on port {port} within {timeout_s:g} s; see {log}")


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process, its descendants and their process groups (Flower detaches some of its
    helpers into groups of their own), then reap it."""
    import psutil

    try:
        root = psutil.Process(process.pid)
        family = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    groups = {process.pid}
    for member in family:  # (never our own group: the caller is not part of the site)
        try:
            groups.add(os.getpgid(member.pid))
        except ProcessLookupError:
            pass
    for group in groups - {os.getpgid(0)}:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=10)
    psutil.wait_procs(family, timeout=10)
