"""A site worker: the long-lived process on a client machine that holds the client model.

Flower starts a fresh ClientApp process for every message, so a model kept in the ClientApp would
be reloaded every round. Instead the ClientApp (clientapp.py) hands each request to this worker
over a unix socket local to the site; the worker loads the model once and serves every round.

Requests and replies are `messages.pack` frames:
  prepare {setup, layers_digest} + realigned layers (or b"")  ->  ready {client, pid, model_loads, model_digest}
  init                                                        ->  adapter (the seeded initial LoRA adapter)
  task    {round, client, seed} + global adapter              ->  result | error
`setup` is the server's `WorkerSetup.shared().to_json()` (its [lora] / training config); the site's
own data shard and model folder come from its node config. The worker exits when the Flower process
it watches (the SuperNode's SuperExec) is gone, so a stopped SuperNode leaves nothing behind.

    python -m fedsoda_cli.federated.flower.site --socket PATH --client K --model-dir DIR --shard FILE [--threads N] [--watch-pid PID]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsoda_cli.federated.flower.framing import recv_frame, send_frame
from fedsoda_cli.federated.messages import pack, pack_result, unpack, unpack_task

if TYPE_CHECKING:
    from fedsoda_cli.federated.worker import ClientRuntime  # imported where used: it brings torch


def model_digest(model_dir: Path) -> str:
    """A digest of every file of a client model folder (names and bytes): equal digests mean the
    site trains the very model the server quantized."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(model_dir).as_posix()}|{path.stat().st_size}|".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def read_shard(path: Path) -> list[tuple[str, str]]:
    """A site's training examples: JSONL lines {"prompt": ..., "answer": ...}."""
    pairs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            record = json.loads(line)
            try:
                pairs.append((str(record["prompt"]), str(record["answer"])))
            except KeyError as exc:
                raise ValueError(f'{path}:{number}: a shard line needs "prompt" and "answer" (missing {exc})') from None
    if not pairs:
        raise ValueError(f"{path}: the shard holds no examples")
    return pairs


class SiteWorker:
    """One client's model holder; `handle(request) -> reply`, both framed bytes."""

    def __init__(self, client: int, model_dir: Path, shard: Path, threads: int):
        self.client, self.model_dir, self.threads = client, Path(model_dir), threads
        self.pairs = read_shard(shard)
        self.digest = model_digest(self.model_dir)
        self.runtime: ClientRuntime | None = None  # loaded by prepare()
        self.setup_key = ""
        self.layers_digest = ""  # "" = the quantized partial layers as loaded
        self.model_loads = 0

    def handle(self, request: bytes) -> bytes:
        kind, header, payload = unpack(request)
        try:
            if kind == "prepare":
                return self.prepare(header, payload)
            if kind == "init":
                return pack("adapter", {}, self._runtime().initial_adapter())
            if kind == "task":
                task = unpack_task(header, payload)
                return pack_result(self._runtime().handle(task, worker=self.client))
        except Exception as exc:  # reported to the server as this client's failure, the worker lives on
            return pack(
                "error", {"round": header.get("round", 0), "client": self.client, "message": f"{type(exc).__name__}: {exc}"}
            )
        return pack("error", {"round": 0, "client": self.client, "message": f"unknown request {kind!r}"})

    def prepare(self, header: dict[str, Any], layers: bytes) -> bytes:
        """Load the model for the server's setup (again only if the setup changed or realigned layers
        must be undone) and swap in the realigned partial layers the server expects."""
        from fedsoda_cli.federated.worker import ClientRuntime, WorkerSetup

        key, wanted = header["setup"], header["layers_digest"]  # key: the server's WorkerSetup.shared().to_json()
        if self.runtime is None or key != self.setup_key or (self.layers_digest and not wanted):
            self.runtime = None  # free the old model before loading the new one
            setup = replace(
                WorkerSetup.from_json(key), model_dir=str(self.model_dir), threads=self.threads, shards={self.client: self.pairs}
            )
            self.runtime = ClientRuntime(setup)
            self.setup_key, self.layers_digest = key, ""
            self.model_loads += 1
        if wanted and wanted != self.layers_digest:
            self.runtime.apply_layers(layers)
            self.layers_digest = wanted
        return pack(
            "ready",
            {
                "client": self.client,
                "pid": os.getpid(),
                "model_loads": self.model_loads,
                "model_digest": self.digest,
                "examples": len(self.pairs),
            },
        )

    def _runtime(self) -> ClientRuntime:
        if self.runtime is None:
            raise RuntimeError("the site worker was not prepared (no model loaded yet)")
        return self.runtime


def serve(path: Path, worker: SiteWorker, watch_pid: int | None) -> None:
    """Accept one connection at a time (one request, one reply) until the watched process is gone."""
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)  # only the site's own user may hand it tasks
    listener.listen(4)
    if watch_pid:
        threading.Thread(target=_exit_when_gone, args=(watch_pid, path), daemon=True).start()
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                send_frame(conn, worker.handle(recv_frame(conn)))
            except (EOFError, OSError):
                pass  # the ClientApp went away mid-request (its SuperNode was stopped): next one


def _exit_when_gone(pid: int, path: Path) -> None:
    import psutil

    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(1.0)
    path.unlink(missing_ok=True)
    os._exit(0)  # the SuperNode is gone: so is this site's worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedsoda_cli.federated.flower.site", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path)
    parser.add_argument("--client", required=True, type=int)
    parser.add_argument("--model-dir", required=True, type=Path)
    parser.add_argument("--shard", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--watch-pid", type=int, default=None)
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    serve(args.socket, SiteWorker(args.client, args.model_dir, args.shard, args.threads), args.watch_pid)


if __name__ == "__main__":
    main()
