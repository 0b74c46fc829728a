"""Each client's training shard as a JSONL file, for its site's `--node-config fedsoda-shard=...`.

The shards are the spec's own partition (the same seeded split the local backend trains on), so a
loopback rehearsal reproduces a local run exactly. In a real deployment each organisation writes
its own file instead: one line {"prompt": ..., "answer": ...} per example.

    python -m fedsoda_cli.federated.flower.shards SPEC OUT_DIR [--set key=value ...]   -> OUT_DIR/client-<k>.jsonl
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from fedsoda_cli.spec import Spec, load_spec


def write_shards(spec: Spec, folder: Path) -> dict[int, Path]:
    """client -> its shard file in `folder`."""
    from fedsoda_cli.data.partition import client_shards

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:  # client_shards also writes a partition.json we do not need here
        shards, _ = client_shards(spec, Path(scratch))
    paths = {}
    for client, pairs in shards.items():
        paths[client] = folder / f"client-{client}.jsonl"
        paths[client].write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in pairs))
    return paths


def main(argv: list[str]) -> None:
    path, out, rest = argv[0], Path(argv[1]), argv[2:]
    spec = load_spec(path, [rest[i + 1] for i, arg in enumerate(rest) if arg == "--set"])
    for client, shard in write_shards(spec, out).items():
        print(f"client {client}: {shard}")


if __name__ == "__main__":
    main(sys.argv[1:])
