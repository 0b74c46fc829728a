"""The ServerApp: the round loop's hands on the Flower Grid.

The SuperLink starts this app for the run that `FlowerTransport` submits. It connects back to the
`fedsoda federate` process over a unix socket on the server machine (path and one-time token in
the run config) and serves its requests until told to stop:
  nodes                                     ->  nodes {ids}
  exchange {timeout_s, items: [{node, type}]}, then one frame per item (the request bytes)
                                            ->  one reply {index, wire_down, wire_up} + bytes or
                                                failed {index, reason, timed_out} per item, then done
  stop                                      ->  (the run ends)
Sampling, aggregation, realignment, accounting and checkpoints stay in fedsoda's FederatedServer,
so they are the same code for every backend. `wire_*` are the bytes Flower serialized for each
message and its reply (before HTTP framing and TLS).
"""

from __future__ import annotations

import socket
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsoda_cli.federated.flower.framing import recv_frame, send_frame
from fedsoda_cli.federated.messages import pack, unpack

RECORD = "fedsoda"
_POLL_S = 0.1

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    link.connect(str(context.run_config["fedsoda-socket"]))
    with link:
        send_frame(link, pack("hello", {"token": str(context.run_config["fedsoda-token"])}))
        while True:
            try:
                kind, header, _ = unpack(recv_frame(link))
            except EOFError:
                return  # the fedsoda process is gone: end the run
            if kind == "stop":
                return
            if kind == "nodes":
                send_frame(link, pack("nodes", {"ids": sorted(int(n) for n in grid.get_node_ids())}))
            elif kind == "exchange":
                requests = [recv_frame(link) for _ in header["items"]]
                exchange(grid, link, header["items"], requests, float(header["timeout_s"]))


def exchange(grid: Grid, link: socket.socket, items: list[dict], requests: list[bytes], timeout_s: float) -> None:
    """Push one message per item, stream each reply back as it arrives, fail what times out."""
    messages = [
        Message(
            RecordDict({RECORD: ConfigRecord({"request": request})}),
            dst_node_id=int(item["node"]),
            message_type=item["type"],
            ttl=timeout_s + 60,
        )
        for item, request in zip(items, requests)
    ]
    sizes = [wire_size(m) for m in messages]
    index = {mid: i for i, mid in enumerate(grid.push_messages(messages))}
    deadline = time.monotonic() + timeout_s
    while index and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(index)):
            i = index.pop(reply.metadata.reply_to_message_id, None)
            if i is None:
                continue
            if reply.has_error():
                send_frame(
                    link,
                    pack(
                        "failed",
                        {"index": i, "reason": f"Flower error {reply.error.code}: {reply.error.reason}", "timed_out": False},
                    ),
                )
            else:
                send_frame(
                    link,
                    pack(
                        "reply",
                        {"index": i, "wire_down": sizes[i], "wire_up": wire_size(reply)},
                        bytes(reply.content[RECORD]["reply"]),  # type: ignore[arg-type]  # Flower's record value union; this one is bytes
                    ),
                )
        if index:
            time.sleep(_POLL_S)
    for i in index.values():
        send_frame(link, pack("failed", {"index": i, "reason": f"no answer within {timeout_s:g} s", "timed_out": True}))
    send_frame(link, pack("done"))


def wire_size(message: Message) -> int:
    """Bytes Flower ships for a message: its object tree, serialized."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())
