"""Deployment subcommands of ``fedpeft``: ``server``, ``client``, ``certs``, ``keys``.

Heavy imports (Flower, torch) happen inside the commands, so ``fedpeft --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def absolute_path(value: str) -> Path:
    """A path argument made absolute against the directory where the command was typed.

    Flower starts its processes in other directories (the site's workspace, the run's
    ``flower/``), so a relative path must not travel any further than the command line.
    """
    return Path(os.path.abspath(os.path.expanduser(value)))


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand whose positionals may also follow its options.

    Plain argparse takes ``JOB.yaml`` and every ``key=value`` in one go, so
    ``fedpeft server job.yaml --deploy d.yaml federation.rounds=3`` would be refused.
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse interface
        if self._intermixing:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _cmd_server(args: argparse.Namespace) -> int:
    from fedpeft.deploy.server_command import prepare_run, serve_job, summary_line
    from fedpeft.errors import ConfigError

    allow = tuple(args.allow_config_change or ())
    if allow and not args.resume:
        raise ConfigError("--allow-config-change only applies with --resume RUN_DIR")
    cfg, dep, run = prepare_run(args.config, args.deploy, args.overrides, args.resume)
    print(f"starting the deployment; run folder: {run.path}")
    serve_job(cfg, dep, run, allow)
    print(summary_line(run))
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    from fedpeft.deploy.client_command import SiteOptions, run_site

    if (args.root_certificates is None) == (not args.insecure):
        print("fedpeft client: give --root-certificates CA.crt (from the coordinator), or "
              "--insecure for a loopback test")
        return 2
    workspace = args.workspace or absolute_path(f"fedpeft-site-{args.name}")
    return run_site(SiteOptions(
        server=args.server, data=args.data, name=args.name, workspace=workspace,
        ca_cert=args.root_certificates, private_key=args.auth_key, device=args.device or "",
        retry_for_s=args.retry_for, allow_remote_code=args.allow_remote_code,
        allow_plugins=tuple(args.allow_plugin), max_epsilon=args.max_epsilon,
        require_secure_aggregation=args.require_secure_aggregation))


def _cmd_certs(args: argparse.Namespace) -> int:
    from fedpeft.deploy.tls import make_tls_files

    files = make_tls_files(Path(args.out), args.host, args.days)
    print(f"wrote {files.ca_cert} (give it to every site), {files.server_cert} and "
          f"{files.server_key} (keep on the server), valid {args.days} days for "
          f"{', '.join([*args.host, 'localhost', '127.0.0.1'])}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from fedpeft.deploy.tls import fingerprint, make_node_keys

    keys = make_node_keys(Path(args.out), args.name)
    print(f"wrote {keys.private_key} (stays on this site: fedpeft client --auth-key) and "
          f"{keys.public_key} (send to the coordinator); fingerprint "
          f"{fingerprint(keys.public_key.read_bytes())}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``server``, ``client``, ``certs`` and ``keys`` to the ``fedpeft`` parser."""
    srv = _add_intermixed(sub, "server", help="coordinate a deployment: sites train on their own machines")
    srv.add_argument("config", nargs="?", type=absolute_path, help="job YAML (the same file a simulation runs)")
    srv.add_argument("overrides", nargs="*", help="key=value overrides of the job (before or after --deploy)")
    srv.add_argument("--deploy", type=absolute_path, help="deployment YAML: sites, TLS, authentication, SecAgg+")
    srv.add_argument("--resume", metavar="RUN_DIR", type=absolute_path,
                     help="go on from the run's last completed round")
    srv.add_argument("--allow-config-change", metavar="KEY", action="append",
                     help="with --resume: a dotted key of the run's config.yaml that may differ from its checkpoint's "
                          "(e.g. federation.rounds to add rounds); repeatable")
    srv.set_defaults(fn=_cmd_server)

    cli = sub.add_parser("client", help="run this site: train on local data for a fedpeft server")
    cli.add_argument("--server", required=True, help="HOST:PORT of the coordinator")
    cli.add_argument("--data", required=True, type=absolute_path, help="this site's JSONL file (never leaves this machine)")
    cli.add_argument("--name", required=True, help="this site's name, as in the coordinator's deploy.yaml")
    cli.add_argument("--root-certificates", type=absolute_path, help="the coordinator's ca.crt")
    cli.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only)")
    cli.add_argument("--auth-key", type=absolute_path, help="this site's private key (fedpeft keys NAME)")
    cli.add_argument("--workspace", type=absolute_path, help="folder for Flower's files (default fedpeft-site-NAME)")
    cli.add_argument("--device", help="e.g. cuda:0 (default: the job's model.devices)")
    cli.add_argument("--retry-for", type=float, default=3600.0,
                     help="seconds to keep retrying an unreachable server")
    cli.add_argument("--allow-remote-code", action="store_true",
                     help="train jobs whose model.trust_remote_code runs the model's own code here")
    cli.add_argument("--allow-plugin", action="append", type=absolute_path, default=[], metavar="FILE.py",
                     help="a plugin file a job may name as PEFT method, aggregator, metric or "
                          "partitioner (repeatable); other plugin files are refused")
    cli.add_argument("--max-epsilon", type=float, metavar="EPS",
                     help="refuse a job whose differential privacy would spend more than EPS (at the job's delta) "
                          "of this site's data over all its rounds; jobs without DP are refused")
    cli.add_argument("--require-secure-aggregation", action="store_true",
                     help="refuse rounds the server does not run with secure aggregation (SecAgg+)")
    cli.set_defaults(fn=_cmd_client)

    certs = sub.add_parser("certs", help="make a CA and a server certificate for a deployment")
    certs.add_argument("out", help="folder for ca.crt, server.pem, server.key")
    certs.add_argument("--host", action="append", default=[],
                       help="name or IP address sites use to reach the server (repeatable)")
    certs.add_argument("--days", type=int, default=30)
    certs.set_defaults(fn=_cmd_certs)

    keys = sub.add_parser("keys", help="make this site's authentication key pair")
    keys.add_argument("name", help="this site's name")
    keys.add_argument("--out", default="keys", help="folder for NAME and NAME.pub")
    keys.set_defaults(fn=_cmd_keys)


def _add_intermixed(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    """``sub.add_parser`` with :class:`_IntermixedParser` (argparse takes one class for all)."""
    parser_class, sub._parser_class = sub._parser_class, _IntermixedParser
    try:
        return sub.add_parser(name, **kwargs)
    finally:
        sub._parser_class = parser_class
