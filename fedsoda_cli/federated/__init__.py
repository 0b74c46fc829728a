"""The federated runtime: what the `federate` stage (`fedsoda_cli/stages/federate.py`) is made of.

server.py      the round loop as a template: sampling, dispatch, validation, aggregation,
               realignment, accounting, checkpoints, resume
transport.py   the protocol a way of reaching clients implements
local.py       ... over worker processes on this machine (the default backend)
inline.py      ... inside the server process (debugging, tests)
worker.py      a worker: one client model loaded once, serving many clients' tasks
client.py      a client's local training (SFT + FedProx proximal term) and its model
messages.py    what crosses the boundary, as bytes (safetensors + JSON, never pickle)
validation.py  checks on client updates and on the aggregator's output
accounting.py  communication bytes by kind and client
checkpoint.py  atomic round checkpoints
realigner.py   the server's intermittent realignment (ODA) every r rounds
console.py     federate's terminal output: partition table, progress, one line per round
"""
