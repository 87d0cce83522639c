"""Natural partition: each client holds the rows of some values of a field (e.g. ``source``).

This models sites that each bring their own data (a cardiology clinic, a neurology clinic).
Values are compared as text. The result does not depend on the seed.
"""

from __future__ import annotations

from collections import Counter

from fedpeft.data.io import field_values
from fedpeft.data.partitioners import PARTITIONERS
from fedpeft.errors import ConfigError, DataError


@PARTITIONERS.register("by_field")
class ByField:
    """Assign whole values of ``field`` to clients.

    Without ``groups``: with as many values as clients, one value per client; with more, values
    are assigned largest first, each to the client holding the fewest rows so far (ties: the
    lowest client index), which balances sizes deterministically.

    Args:
        field: Row field naming each row's site (``source`` in the sample data).
        groups: One list of values per client (``[[cardiology], [neurology, infectious]]``);
            every value of ``field`` must be in exactly one list.

    Raises:
        ConfigError: if a group is empty or a value is in two groups.
    """

    def __init__(self, field: str = "source", groups: list[list[str]] | None = None) -> None:
        if not field:
            raise ConfigError("by_field: `field` must name a row field, got an empty string")
        if groups is not None:
            _check_groups(groups)
        self.field = field
        self.groups = groups

    def partition(self, rows: list[dict], num_clients: int, seed: int) -> list[list[int]]:
        """Row indices of each client (each sorted); every row goes to exactly one client.

        Raises:
            DataError: if a row lacks ``field``, there are fewer values than clients, or
                ``groups`` does not match the clients or the values found.
        """
        hint = "Set federation.partition.field to a field every row has."
        values = [str(v) for v in field_values(rows, self.field, hint=hint)]
        counts = Counter(values)
        if self.groups is not None:
            client_of = self._grouped(counts, num_clients)
        else:
            client_of = self._balanced(counts, num_clients)
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for i, value in enumerate(values):
            parts[client_of[value]].append(i)
        return parts

    def _balanced(self, counts: Counter[str], num_clients: int) -> dict[str, int]:
        if len(counts) < num_clients:
            raise DataError(
                f"by_field: field {self.field!r} has {len(counts)} distinct values "
                f"({_describe(counts)}) but {num_clients} clients were asked for, and each client "
                f"needs at least one value. Use federation.num_clients <= {len(counts)}, or "
                "method 'dirichlet' or 'iid' to spread rows of one value over several clients."
            )
        sizes = [0] * num_clients
        client_of: dict[str, int] = {}
        for value in sorted(counts, key=lambda v: (-counts[v], v)):
            client = min(range(num_clients), key=lambda c: (sizes[c], c))
            client_of[value] = client
            sizes[client] += counts[value]
        return client_of

    def _grouped(self, counts: Counter[str], num_clients: int) -> dict[str, int]:
        assert self.groups is not None
        if len(self.groups) != num_clients:
            raise DataError(f"by_field: `groups` has {len(self.groups)} lists but federation.num_clients "
                            f"is {num_clients}; give one list of {self.field!r} values per client")
        client_of = {str(v): c for c, group in enumerate(self.groups) for v in group}
        unknown = [v for v in client_of if v not in counts]
        if unknown:
            raise DataError(f"by_field: `groups` names {unknown}, which no row has in field "
                            f"{self.field!r}; values found: {_describe(counts)}")
        unassigned = [v for v in counts if v not in client_of]
        if unassigned:
            raise DataError(f"by_field: rows with {self.field!r} values {sorted(unassigned)} belong to no "
                            f"group; add each to one list of `groups` (values found: {_describe(counts)})")
        return client_of


def _check_groups(groups: list[list[str]]) -> None:
    seen: set[str] = set()
    for c, group in enumerate(groups):
        if not group:
            raise ConfigError(f"by_field: `groups[{c}]` is empty; each client needs at least one value")
        for value in group:
            if str(value) in seen:
                raise ConfigError(f"by_field: value {value!r} is in two groups; put it in one")
            seen.add(str(value))


def _describe(counts: Counter[str]) -> str:
    return ", ".join(f"{v!r} ({n} rows)" for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
