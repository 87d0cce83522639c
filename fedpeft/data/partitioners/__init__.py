"""Split one data set over simulated clients; partitioners registered by name in :data:`PARTITIONERS`.

A partitioner is a class whose typed ``__init__`` keyword arguments are its parameters
(``federation.partition`` in YAML, beside ``method``) and whose method
``partition(rows, num_clients, seed) -> list[list[int]]`` returns the row indices of each client.
Every row goes to exactly one client unless the partitioner documents otherwise.

* ``iid``: seeded shuffle, near-equal sizes.
* ``dirichlet``: label skew over a field (Hsu et al. 2019), ``alpha`` controls how much.
* ``by_field``: natural sites, whole values of a field (``source``) per client.

:func:`partition_rows` checks what any partitioner (plugins included) returns: one part per
client, indices in range and used once, and no client left without rows.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Protocol

from fedpeft.errors import ConfigError, DataError
from fedpeft.params import instantiate
from fedpeft.registry import Registry

log = logging.getLogger(__name__)


class Partitioner(Protocol):
    """What :func:`partition_rows` needs from a registered partitioner."""

    def partition(self, rows: list[dict], num_clients: int, seed: int) -> list[list[int]]: ...


PARTITIONERS: Registry[type] = Registry("partitioners")

# Each module registers its class into PARTITIONERS on import, so they come after it exists.
from fedpeft.data.partitioners.by_field import ByField  # noqa: E402
from fedpeft.data.partitioners.dirichlet import Dirichlet  # noqa: E402
from fedpeft.data.partitioners.iid import IID  # noqa: E402

__all__ = [
    "IID",
    "PARTITIONERS",
    "ByField",
    "Dirichlet",
    "Partitioner",
    "build_partitioner",
    "partition_rows",
    "partition_summary",
]


def build_partitioner(method: str, params: dict[str, Any] | None = None) -> Partitioner:
    """Construct the partitioner registered as ``method`` with ``params``.

    Args:
        method: A registered name (``"dirichlet"``), a ``path/file.py:Class`` plugin or an
            entry point in group ``fedpeft.partitioners``.
        params: Keyword arguments of the class's ``__init__`` (from YAML; coerced to its types).

    Returns:
        The partitioner instance.

    Raises:
        RegistryError: if ``method`` is unknown (the message lists the valid names).
        ConfigError: if ``params`` has unknown keys, wrong types or out-of-range values.
    """
    return instantiate(PARTITIONERS, method, params, "partitioner")


def partition_rows(
    rows: list[dict],
    num_clients: int,
    seed: int,
    method: str = "iid",
    params: dict[str, Any] | None = None,
) -> list[list[dict]]:
    """Split ``rows`` over ``num_clients`` clients with the partitioner ``method``.

    Args:
        rows: Loaded examples.
        num_clients: Number of clients (>= 1).
        seed: Seed; the same seed gives the same partition.
        method: Partitioner name (``federation.partition.method``).
        params: Its parameters (the other keys of ``federation.partition``).

    Returns:
        The rows of each client, in client order.

    Raises:
        ConfigError: if ``num_clients`` < 1 or ``params`` are invalid.
        RegistryError: if ``method`` is unknown.
        DataError: if there are fewer rows than clients, a client gets no rows, or the
            partitioner returns an invalid assignment.
    """
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if len(rows) < num_clients:
        raise DataError(f"cannot give {num_clients} clients at least one row each from {len(rows)} "
                        "rows; use fewer clients (federation.num_clients) or more data")
    partitioner = build_partitioner(method, params)
    parts = partitioner.partition(rows, num_clients, seed)
    check_partition(parts, len(rows), num_clients, method)
    return [[rows[i] for i in part] for part in parts]


def check_partition(parts: list[list[int]], num_rows: int, num_clients: int, method: str) -> None:
    """Check a partitioner's output: one non-empty part per client, each index valid and used once.

    Raises:
        DataError: naming the offending client and how to fix it.
    """
    if len(parts) != num_clients:
        raise DataError(f"partitioner {method!r} returned {len(parts)} parts for {num_clients} clients")
    seen: set[int] = set()
    for client, part in enumerate(parts):
        if not part:
            raise DataError(
                f"client {client} of {num_clients} got no rows from partitioner {method!r}. Use fewer "
                "clients (federation.num_clients), a larger alpha (dirichlet: smaller alpha means more "
                "skew and more empty clients), or another method (e.g. federation.partition.method: iid)."
            )
        for i in part:
            if not 0 <= i < num_rows or i in seen:
                problem = "out of range" if not 0 <= i < num_rows else "given to two clients"
                raise DataError(f"partitioner {method!r}: row index {i} of client {client} is {problem} "
                                f"({num_rows} rows)")
            seen.add(i)
    if len(seen) < num_rows:
        log.info("partitioner %r left %d of %d rows unassigned", method, num_rows - len(seen), num_rows)


def partition_summary(parts: list[list[dict]], field: str | None = None) -> list[dict]:
    """Per client: its size and, with ``field``, how many rows hold each value of ``field``.

    Args:
        parts: The rows of each client (as :func:`partition_rows` returns them).
        field: Field to count values of; rows without it count under ``"(missing)"``.

    Returns:
        ``[{"client": 0, "size": 20, "counts": {"symptoms": 8, ...}}, ...]``; ``counts`` only
        with ``field``, most frequent value first.
    """
    summary: list[dict] = []
    for client, rows in enumerate(parts):
        entry: dict[str, Any] = {"client": client, "size": len(rows)}
        if field is not None:
            counts = Counter(str(r[field]) if r.get(field) is not None else "(missing)" for r in rows)
            entry["counts"] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        summary.append(entry)
    return summary
