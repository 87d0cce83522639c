"""The deployment config (``deploy.yaml``): sites, TLS, authentication, SecAgg+, timeouts.

The job config (model, PEFT, aggregation, rounds, clients per round, min clients) is the same
YAML a simulation runs; ``deploy.yaml`` adds what only a deployment has. Site ``i`` of
``sites`` trains like client ``i`` (``client-i``, ``data.client_files[i]``) of the simulation.
Relative paths are relative to the ``deploy.yaml`` file. One
:class:`~fedpeft.errors.ConfigError` lists every problem (:mod:`fedpeft.problems`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from fedpeft.config import JobConfig
from fedpeft.problems import Loc, Problems, read_yaml

SITE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsConfig(_Section):
    """PEM files for the SuperLink (``fedpeft certs`` makes them for a test deployment)."""

    ca_cert: Path  # sites get this file to verify the server
    server_cert: Path
    server_key: Path  # secret: stays on the server


class SiteConfig(_Section):
    """One site. Its position in ``sites`` is its client index (seed, order of aggregation)."""

    name: str = Field(pattern=SITE_NAME_PATTERN)
    public_key: Path | None = None  # OpenSSH public key (``fedpeft keys NAME``); needed with auth
    rank: int | None = Field(None, ge=1)  # this site's LoRA rank (<= peft.r); wins over federation.client_ranks


class SecAggConfig(_Section):
    """SecAgg+ (Flower's ``SecAggPlusWorkflow``): the server sees only the weighted mean.

    Error of the mean per value and round: see docs/deploy-notes.md section 5 and
    :func:`fedpeft.deploy.secagg.error_bound`.
    """

    enabled: bool = False
    clipping_range: float = Field(1.0, gt=0)  # >= max |update - global| of one round never clips
    quantization_range: int = Field(2**22, ge=2)  # levels over [-clip, clip]; sites*Q < 2**32
    max_weight: float = Field(1000.0, gt=0)  # >= the largest site's training examples
    num_shares: float | int = 1.0  # float: fraction of the sampled sites
    reconstruction_threshold: float | int = 0.7  # float: fraction of num_shares; dropouts tolerated


class DeployConfig(_Section):
    """Everything a deployment adds to the job config."""

    listen: str = "0.0.0.0:9092"  # host:port of the SuperLink; sites connect to it
    insecure: bool = False  # plain HTTP; loopback tests only (a warning is logged)
    tls: TlsConfig | None = None
    authenticate: bool = True  # only sites whose public_key is registered may join
    sites: list[SiteConfig] = Field(min_length=1)
    secure_aggregation: SecAggConfig = SecAggConfig()
    wait_for_sites_s: float = Field(600.0, gt=0)  # before a round, wait this long for its sites
    round_timeout_s: float = Field(3600.0, gt=0)  # a site that has not replied by then is dropped
    round_retries: int = Field(1, ge=0)  # retries of a round that fell below min_clients
    poll_s: float = Field(0.5, gt=0)  # server's poll for replies

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host, int(port)

    def run_timeout_s(self, rounds: int) -> float:
        """Upper bound on a whole run (every wait of every round and retry, plus setup)."""
        per_round = (self.round_retries + 1) * (self.wait_for_sites_s + self.round_timeout_s * (
            4 if self.secure_aggregation.enabled else 1))
        return 600.0 + self.wait_for_sites_s + rounds * per_round


def _check(dep: DeployConfig, job: JobConfig, add: Callable[[Loc, str], None]) -> None:
    """Record what the schema cannot see: site names and count, TLS and authentication, files."""
    names = dep.site_names
    if len(set(names)) != len(names):
        add(("sites",), f"names must be unique (got {names})")
    if len(names) != job.federation.num_clients:
        add(("sites",), f"lists {len(names)} sites but the job's federation.num_clients is "
            f"{job.federation.num_clients}; site i trains like simulation client i")
    if dep.insecure and dep.tls is not None:
        add(("insecure",), "insecure: true and tls are both set; remove one")
    if not dep.insecure and dep.tls is None:
        add(("tls",), "missing; give ca_cert/server_cert/server_key (make them with "
            "`fedpeft certs DIR --host SERVER_NAME`), or insecure: true on loopback")
    if dep.authenticate and dep.insecure:
        add(("authenticate",), "needs TLS (Flower refuses SuperNode authentication "
            "without it); set authenticate: false to test on loopback")
    missing = [s.name for s in dep.sites if s.public_key is None]
    if dep.authenticate and missing:
        add(("sites",), f"{missing} have no public_key; authentication needs every site's "
            "key (`fedpeft keys NAME` at the site) or authenticate: false")
    for i, site in enumerate(dep.sites):
        if site.public_key is not None and not site.public_key.is_file():
            add(("sites", i, "public_key"), f"site {site.name!r}: file not found: {site.public_key}")
    for field in ("ca_cert", "server_cert", "server_key") if dep.tls is not None else ():
        if not getattr(dep.tls, field).is_file():
            add(("tls", field), f"file not found: {getattr(dep.tls, field)}")
    try:
        dep.host_port
    except ValueError:
        add(("listen",), f"expected HOST:PORT (e.g. 0.0.0.0:9092), got {dep.listen!r}")
    _check_secagg(dep.secure_aggregation, job, add)
    _check_ranks(dep, job, add)


def _check_ranks(dep: DeployConfig, job: JobConfig, add: Callable[[Loc, str], None]) -> None:
    top = int(job.peft.params.get("r", 16))
    for i, site in enumerate(dep.sites):
        if site.rank is None:
            continue
        if job.peft.method not in ("lora", "ffa_lora"):
            add(("sites", i, "rank"), f"site {site.name!r}: a rank needs peft.method lora or ffa_lora, not "
                f"{job.peft.method!r}")
        elif site.rank > top:
            add(("sites", i, "rank"), f"site {site.name!r}: rank {site.rank} is above peft.r ({top}), the global "
                "adapter's rank; lower it or raise peft.r")


def site_ranks(dep: DeployConfig, job: JobConfig) -> list[int | None] | None:
    """Each site's rank: its ``rank`` in deploy.yaml, else ``federation.client_ranks``; None: all full."""
    ranks = [s.rank if s.rank is not None else (job.federation.client_ranks or [None] * len(dep.sites))[i]
             for i, s in enumerate(dep.sites)]
    return None if all(r is None for r in ranks) else ranks


def _check_secagg(sa: SecAggConfig, job: JobConfig, add: Callable[[Loc, str], None]) -> None:
    if not sa.enabled:
        return
    if job.sampled_per_round() < 2:
        add(("secure_aggregation", "enabled"), "needs at least 2 sites per round (SecAgg+ refuses "
            f"fewer); the job samples {job.sampled_per_round()}")
    from fedpeft.aggregators import AGGREGATORS  # torch: only when SecAgg+ is on

    rule = job.federation.aggregation.name
    if getattr(AGGREGATORS.get(rule), "individual_updates", False):
        add(("secure_aggregation", "enabled"), f"the job's aggregation {rule!r} must see each site's update "
            "(secure aggregation reveals only their mean); disable one, or aggregate with fedavg, fedavgm, ...")
    codecs = {way: getattr(job.federation.compression, way).name for way in ("up", "down")}
    if any(name != "none" for name in codecs.values()):
        add(("secure_aggregation", "enabled"), f"the job compresses updates ({codecs}); SecAgg+ quantises and "
            "masks them itself; set federation.compression up and down to none, or disable secure aggregation")
    if job.sampled_per_round() * sa.quantization_range >= 2**32:
        add(("secure_aggregation", "quantization_range"), "sites per round x range must be "
            f"< 2**32 (sums are taken mod 2**32); got {sa.quantization_range}")


def _resolve(tree: dict, base: Path) -> dict:
    """Make relative paths in ``tree`` relative to ``base`` (the deploy.yaml's folder)."""
    def fix(value: object) -> object:
        return str(base / value) if isinstance(value, str) and not Path(value).is_absolute() else value
    tree = dict(tree)
    if isinstance(tree.get("tls"), dict):
        tree["tls"] = {k: fix(v) for k, v in tree["tls"].items()}
    if isinstance(tree.get("sites"), list):
        tree["sites"] = [{**s, "public_key": fix(s["public_key"])}
                         if isinstance(s, dict) and s.get("public_key") else s for s in tree["sites"]]
    return tree


def load_deploy_config(path: str | Path, job: JobConfig) -> DeployConfig:
    """Read and check ``deploy.yaml`` against the job it deploys.

    Raises:
        ConfigError: listing every problem (file, line, YAML path, bad value, what would be valid).
    """
    path = Path(path)
    source = str(path)
    problems = Problems()
    tree, root = read_yaml(path, problems)
    if not problems and not isinstance(tree, dict | None):
        problems.add(source, (), f"expected a mapping (listen, tls, sites, ...), got {type(tree).__name__}")
    problems.raise_if_any(source)
    dep: DeployConfig | None = None
    try:
        dep = DeployConfig.model_validate(_resolve(tree or {}, path.resolve().parent))
    except pydantic.ValidationError as e:
        problems.add_validation_error(e, DeployConfig, source, root)
    if dep is not None:
        _check(dep, job, lambda loc, message: problems.add(source, loc, message, root))
    problems.raise_if_any(source)
    assert dep is not None
    return dep


def dump_deploy_config(dep: DeployConfig) -> str:
    """The resolved deployment config as YAML (absolute paths; written into the run folder)."""
    return yaml.safe_dump(dep.model_dump(mode="json"), sort_keys=False)
