"""Multi-site deployment on Flower 1.42 (SuperLink / SuperNodes): thin adapters around the core.

The coordinator runs ``fedpeft server JOB.yaml --deploy DEPLOY.yaml``; each site runs
``fedpeft client --server HOST:PORT --data its_own.jsonl --name site-a``. The same job YAML runs
as a simulation (``fedpeft run``) and gives the same global adapter.

Server side:

- :mod:`~fedpeft.deploy.server_command`: ``fedpeft server`` (SuperLink, key registration, ``flwr run``).
- :mod:`~fedpeft.deploy.server_app`: the ``ServerApp``; :mod:`~fedpeft.deploy.flower_pool`: the sites as the client pool
  of the one round loop (:mod:`fedpeft.rounds`, shared with the simulation); :mod:`~fedpeft.deploy.transport`:
  Flower messages; :mod:`~fedpeft.deploy.secagg`: SecAgg+; :mod:`~fedpeft.deploy.counting_grid`: polling
  and byte counts.
- :mod:`~fedpeft.deploy.settings`: ``deploy.yaml`` (sites, TLS, authentication, SecAgg+, timeouts).

Site side:

- :mod:`~fedpeft.deploy.client_command`: ``fedpeft client`` (SuperNode and trainer processes).
- :mod:`~fedpeft.deploy.client_app`: the light ``ClientApp``; :mod:`~fedpeft.deploy.trainer_service`:
  its socket to the long-lived :mod:`~fedpeft.deploy.site_training` trainer (the core's ``fit``).
- :mod:`~fedpeft.deploy.wire`: what the server tells a site about the job (never a path).
- :mod:`~fedpeft.deploy.site_policy`: the code a site lets a job run (``--allow-remote-code``,
  ``--allow-plugin``); anything else is refused before it is loaded.

Shared: :mod:`~fedpeft.deploy.launch` (processes, environment), :mod:`~fedpeft.deploy.tls`
(``fedpeft certs``/``keys``), :mod:`~fedpeft.deploy.records`, :mod:`~fedpeft.deploy.loopback`
(a whole deployment on one machine), :mod:`~fedpeft.deploy.demo` (deployment vs simulation).

See ``docs/deploy-notes.md`` for Flower's flags, pitfalls and the measurements.
"""
