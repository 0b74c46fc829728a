"""The Flower backend (`federate.backend = "flower"`): clients are SuperNodes of a Flower deployment.

  transport.py   FlowerTransport: the ClientTransport the unchanged FederatedServer drives; it
                 submits the fedsoda Flower App with `flwr run` and talks to its ServerApp
  serverapp.py   the ServerApp: relays the round loop's requests to the Grid (push, pull, nodes)
  clientapp.py   the ClientApp: hands each message to its site's long-lived worker (unix socket),
                 starting that worker on first use
  site.py        the site worker: holds the client model once, serves prepare / init / task
  framing.py     length-prefixed frames over a socket (both local links above)
  bundle.py      the Flower App folder `flwr run` submits; environment that keeps Flower offline
  federation.py  a loopback federation (SuperLink + N SuperNodes) for rehearsals, tests, benchmarks
  shards.py      each client's training shard as a JSONL file, for a site's --node-config

Flower is imported only inside these modules, so the local backend never needs it.
"""
