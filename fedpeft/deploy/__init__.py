"""Flower deployment runtime (flwr 1.42 Message API): thin adapters around the fedpeft core.

- :mod:`fedpeft.deploy.apps`: the ``ServerApp`` and ``ClientApp`` (what ``flwr run`` starts).
- :mod:`fedpeft.deploy.secagg`: SecAgg+ glue (server workflow adapter, client mod).
- :mod:`fedpeft.deploy.records`: ``State`` <-> ``ArrayRecord`` conversion.
- :mod:`fedpeft.deploy.launch`: start SuperLink + SuperNodes + a run as processes on loopback.
- :mod:`fedpeft.deploy.tls`: CA / server certificate and SuperNode key generation.
- :mod:`fedpeft.deploy.demo`: `python -m fedpeft.deploy.demo WS --tls --auth --secagg ...`.

See ``docs/deploy-notes.md`` for the exact commands, flags and pitfalls.
"""
