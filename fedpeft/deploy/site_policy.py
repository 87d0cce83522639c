"""What code a site lets the coordinator run on its machine: its own command line decides.

A job can make a site run code two ways: ``model.trust_remote_code`` (the Python files of the
model's repository) and plugin files, ``path/to/file.py:Object`` given as a PEFT method,
aggregator, metric or partitioner name (:mod:`fedpeft.registry`). The coordinator writes the job;
a site (a hospital's machine) runs such code only if its operator allowed it when starting
``fedpeft client``: ``--allow-remote-code`` and ``--allow-plugin FILE`` (repeatable). The
allowance lives in the site's own options (:class:`SitePolicy`), never in what the server sends.

Entry-point plugins (installed packages) need no flag: the site's operator installed them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedpeft.errors import ConfigError
from fedpeft.registry import plugin_file

if TYPE_CHECKING:
    from fedpeft.config import JobConfig

ALLOW_REMOTE_CODE_FLAG = "--allow-remote-code"
ALLOW_PLUGIN_FLAG = "--allow-plugin"
MAX_EPSILON_FLAG = "--max-epsilon"
REQUIRE_SECAGG_FLAG = "--require-secure-aggregation"


class SiteRefusal(ConfigError):
    """The job asks for code this site did not allow.

    The message names only what the server asked for and the flag that would allow it, so it is
    safe to send back to the server (unlike other site errors, which are reported by type only).
    """


@dataclass(frozen=True)
class SitePolicy:
    """The code a site allows (default: none).

    Args:
        allow_remote_code: Load models with ``trust_remote_code`` when a job asks for it.
        plugins: Resolved real paths of the plugin files the site allows.
    """

    allow_remote_code: bool = False
    plugins: frozenset[Path] = frozenset()
    max_epsilon: float | None = None  # --max-epsilon: refuse a job that would spend more on this site
    require_secure_aggregation: bool = False  # --require-secure-aggregation

    @classmethod
    def from_flags(cls, allow_remote_code: bool = False, plugins: Iterable[str | Path] = (),
                   max_epsilon: float | None = None, require_secure_aggregation: bool = False) -> SitePolicy:
        """The policy of ``fedpeft client --allow-remote-code --allow-plugin FILE ...``.

        Args:
            allow_remote_code: ``--allow-remote-code`` was given.
            plugins: The ``--allow-plugin`` values: ``file.py`` or ``file.py:Object`` (the
                whole file is allowed: importing it runs it).

        Raises:
            ConfigError: if a plugin is not an existing ``.py`` file.
        """
        resolved = []
        for spec in plugins:
            path = plugin_file(str(spec))
            if path is None or not path.is_file():
                raise ConfigError(f"{ALLOW_PLUGIN_FLAG} {spec}: expected an existing Python file "
                                  "(path/to/file.py or path/to/file.py:Object)")
            resolved.append(path)
        if max_epsilon is not None and not max_epsilon > 0:
            raise ConfigError(f"{MAX_EPSILON_FLAG} {max_epsilon}: expected a positive number, e.g. 8")
        return cls(allow_remote_code, frozenset(resolved), max_epsilon, require_secure_aggregation)


def named_code(cfg: JobConfig) -> list[tuple[str, str]]:
    """Every registry name of ``cfg`` that names a plugin file, as ``(yaml key, name)`` pairs."""
    names = [("peft.method", cfg.peft.method),
             ("federation.aggregation.name", cfg.federation.aggregation.name),
             ("federation.partition.method", cfg.federation.partition.method)]
    names += [(f"eval.metrics[{i}]", m) for i, m in enumerate(cfg.eval.metrics)]
    return [(key, name) for key, name in names if plugin_file(name) is not None]


def check_job(cfg: JobConfig, policy: SitePolicy, site: str) -> None:
    """Refuse ``cfg`` if it asks for code ``policy`` does not allow; call before loading anything.

    Args:
        cfg: The job the server sent (:func:`fedpeft.deploy.wire.site_job_from_payload`).
        policy: This site's own allowance.
        site: This site's name (for the message).

    Raises:
        SiteRefusal: naming each thing the job asked for and the flag that would allow it.
    """
    problems = []
    if cfg.model.trust_remote_code and not policy.allow_remote_code:
        problems.append(f"model.trust_remote_code=true would run the Python code of model "
                        f"{cfg.model.name!r} on this site (allow it with: fedpeft client ... "
                        f"{ALLOW_REMOTE_CODE_FLAG})")
    for key, name in named_code(cfg):
        if plugin_file(name) not in policy.plugins:
            file_part = name.partition(".py")[0] + ".py"
            problems.append(f"{key} {name!r} is a plugin file this site did not allow (allow it "
                            f"with: fedpeft client ... {ALLOW_PLUGIN_FLAG} {file_part})")
    if problems:
        raise SiteRefusal(f"site {site!r} refuses the job: " + "; ".join(problems))


def check_privacy(cfg: JobConfig, policy: SitePolicy, site: str, *, secure: bool, num_examples: int,
                  shares: int) -> None:
    """Refuse a round that breaks this site's privacy rules (``--max-epsilon``, ``--require-secure-aggregation``).

    The epsilon is what this site's data would reach over every round of the job, against the
    coordinator (:func:`fedpeft.privacy.ledger.site_epsilon`); the noise is added here, on the
    site, so the bound holds even if the coordinator is dishonest.

    Args:
        secure: The update goes through SecAgg+ (seen by this site's own ClientApp).
        num_examples: This site's training examples (example level).
        shares: Sites sampled this round (client level without SecAgg+: the coordinator sees
            this site's update with only its share of the noise).

    Raises:
        SiteRefusal: naming the rule and what the job would give.
    """
    problems = []
    if policy.require_secure_aggregation and not secure:
        problems.append(f"this site requires secure aggregation ({REQUIRE_SECAGG_FLAG}) and the server sent a "
                        "plain round (set secure_aggregation: {enabled: true} in deploy.yaml)")
    if policy.max_epsilon is not None:
        from fedpeft.privacy.ledger import site_epsilon

        eps = site_epsilon(cfg, num_examples, shares, secure)
        if not eps <= policy.max_epsilon:
            problems.append(f"the job would spend epsilon {eps:.3g} (delta {cfg.privacy.delta:g}, privacy.level "
                            f"{cfg.privacy.level!r}) of this site's data over {cfg.federation.rounds} rounds; this "
                            f"site allows at most {MAX_EPSILON_FLAG} {policy.max_epsilon:g}")
    if problems:
        raise SiteRefusal(f"site {site!r} refuses the job: " + "; ".join(problems))
