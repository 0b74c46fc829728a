"""The ClientApp: a thin bridge from a Flower message to this site's long-lived worker (site.py).

Flower starts a fresh process for each message; loading the model here would reload it every
round. So this process only forwards the request bytes over the site's unix socket and returns the
reply; it starts the site worker the first time (detached from this short-lived process, watching
the SuperNode's SuperExec so it stops with the SuperNode). No torch is imported here.

Node config (`flower-supernode --node-config '...'`):
  fedsoda-client  this site's client index k (0 .. federate.clients-1)
  fedsoda-model   the client model folder (a copy of the server's <workdir>/quantize/model)
  fedsoda-shard   this site's training data, JSONL lines {"prompt": ..., "answer": ...}
  fedsoda-socket  (optional) the worker's unix socket; default <tmp>/fedsoda-site-<uid>-<k>.sock
  fedsoda-threads (optional) torch threads of the worker; default 1
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsoda_cli.federated.flower.framing import recv_frame, send_frame
from fedsoda_cli.federated.messages import pack, unpack

RECORD = "fedsoda"  # the RecordDict key both apps use
_START_WAIT_S = 120.0  # the worker binds its socket before loading the model: this is import time only

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _forward(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _forward(msg, context)


def _forward(msg: Message, context: Context) -> Message:
    request = bytes(msg.content[RECORD]["request"])  # type: ignore[arg-type]  # Flower types a record value as its whole value union; this one is bytes
    kind, _, _ = unpack(request)
    config = context.node_config
    if kind == "hello":  # answered here: which client this node is, without touching the model
        reply = pack("hello", {"client": int(config["fedsoda-client"])})
    else:
        reply = call_site(config, request)
    return Message(RecordDict({RECORD: ConfigRecord({"reply": reply})}), reply_to=msg)


def socket_path(config) -> Path:
    default = Path(tempfile.gettempdir()) / f"fedsoda-site-{os.getuid()}-{int(config['fedsoda-client'])}.sock"
    return Path(str(config.get("fedsoda-socket", default)))


def call_site(config, request: bytes) -> bytes:
    """Send one request to the site worker (starting it if none listens) and return its reply."""
    path = socket_path(config)
    sock = _connect(path)
    if sock is None:
        with open(f"{path}.lock", "w") as lock:  # one ClientApp starts the worker, others wait for it
            fcntl.flock(lock, fcntl.LOCK_EX)
            sock = _connect(path)
            if sock is None:
                _start_worker(config, path)
                sock = _wait_for(path)
    with sock:
        send_frame(sock, request)
        return recv_frame(sock)


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None


def _wait_for(path: Path) -> socket.socket:
    deadline = time.monotonic() + _START_WAIT_S
    while time.monotonic() < deadline:
        sock = _connect(path)
        if sock is not None:
            return sock
        time.sleep(0.1)
    raise RuntimeError(f"the fedsoda site worker did not open {path} within {_START_WAIT_S:g} s; see {path}.log")


def _start_worker(config, path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "fedsoda_cli.federated.flower.site",
        "--socket",
        str(path),
        "--client",
        str(int(config["fedsoda-client"])),
        "--model-dir",
        str(config["fedsoda-model"]),
        "--shard",
        str(config["fedsoda-shard"]),
        "--threads",
        str(int(config.get("fedsoda-threads", 1))),
        "--watch-pid",
        str(os.getppid()),
    ]  # our parent is the SuperNode's SuperExec, which lives as long as it
    with open(f"{path}.log", "ab") as log:
        # Same process group as the SuperNode (no new session), so stopping the site's group stops it too.
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)
