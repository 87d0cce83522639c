"""Partitioners: reproducible, complete and disjoint; skew, natural sites, and clear errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedpeft.data.io import SAMPLE_PATH, load_examples
from fedpeft.data.partitioners import (
    PARTITIONERS,
    Dirichlet,
    build_partitioner,
    partition_rows,
    partition_summary,
)
from fedpeft.errors import ConfigError, DataError, RegistryError

SIZES = {"cardiology": 26, "infectious": 22, "endocrinology": 18, "neurology": 14}
METHODS = [("iid", {}), ("dirichlet", {"alpha": 1.0}), ("dirichlet", {"field": "focus", "alpha": 5.0}),
           ("by_field", {}), ("by_field", {"groups": [["cardiology"], ["infectious", "neurology", "endocrinology"]]})]


@pytest.fixture(scope="module")
def sample() -> list[dict]:
    return load_examples(SAMPLE_PATH)


def labelled(counts: dict[str, int]) -> list[dict]:
    """Rows with a ``label`` field, ``counts[label]`` of each."""
    return [{"id": f"{k}{i}", "label": k} for k, n in counts.items() for i in range(n)]


def client_ids(parts: list[list[dict]]) -> list[list[str]]:
    return [[r["id"] for r in part] for part in parts]


def test_registry_lists_the_builtins() -> None:
    assert {"iid", "dirichlet", "by_field"} <= set(PARTITIONERS.names())
    with pytest.raises(RegistryError, match=r"unknown partitioner 'diriclet'.*'dirichlet'.*Valid names: .*iid"):
        PARTITIONERS.get("diriclet")


@pytest.mark.parametrize(("method", "params"), METHODS)
def test_partition_is_complete_disjoint_and_reproducible(sample: list[dict], method: str, params: dict) -> None:
    num_clients = 2 if "groups" in params else 4
    parts = client_ids(partition_rows(sample, num_clients, 7, method, params))
    flat = [i for part in parts for i in part]
    assert len(parts) == num_clients and all(parts)
    assert sorted(flat) == sorted(r["id"] for r in sample) and len(set(flat)) == len(flat)
    assert client_ids(partition_rows(sample, num_clients, 7, method, params)) == parts


@pytest.mark.parametrize(("method", "params"), [m for m in METHODS if m[0] != "by_field"])
def test_another_seed_gives_another_partition(sample: list[dict], method: str, params: dict) -> None:
    assert client_ids(partition_rows(sample, 4, 1, method, params)) != client_ids(
        partition_rows(sample, 4, 2, method, params))


def test_iid_sizes_differ_by_at_most_one(sample: list[dict]) -> None:
    sizes = [len(p) for p in partition_rows(sample, 3, 0, "iid")]
    assert sorted(sizes) == [26, 27, 27]


def top_client_share(parts: list[list[int]], rows: list[dict]) -> float:
    """Mean over labels of the fraction of that label's rows held by its largest client."""
    label_of = [r["label"] for r in rows]
    shares = []
    for label in set(label_of):
        per_client = [sum(label_of[i] == label for i in part) for part in parts]
        shares.append(max(per_client) / sum(per_client))
    return float(np.mean(shares))


def test_dirichlet_small_alpha_skews_labels() -> None:
    rows = labelled({"a": 100, "b": 100, "c": 100, "d": 100})
    skewed = top_client_share(Dirichlet(field="label", alpha=0.05).partition(rows, 4, 0), rows)
    near_iid = top_client_share(Dirichlet(field="label", alpha=1000.0).partition(rows, 4, 0), rows)
    assert skewed > 0.8 and near_iid < 0.35


def test_dirichlet_alpha_must_be_positive(sample: list[dict]) -> None:
    with pytest.raises(ConfigError, match=r"`alpha` must be > 0, got 0"):
        partition_rows(sample, 4, 0, "dirichlet", {"alpha": 0})


@pytest.mark.parametrize("method", ["dirichlet", "by_field"])
def test_missing_field_names_field_and_row(method: str) -> None:
    rows = labelled({"a": 3, "b": 3})
    del rows[4]["label"]
    with pytest.raises(DataError, match=r"row at index 4 \(id 'b1'\) has no field 'label'.*partition\.field"):
        partition_rows(rows, 2, 0, method, {"field": "label"})


def test_by_field_one_value_per_client(sample: list[dict]) -> None:
    parts = partition_rows(sample, 4, 0, "by_field")
    sources = [{r["source"] for r in part} for part in parts]
    assert all(len(s) == 1 for s in sources)
    assert {s.pop(): len(p) for s, p in zip(sources, parts)} == SIZES


def test_by_field_more_values_than_clients_balances_sizes(sample: list[dict]) -> None:
    parts = partition_rows(sample, 2, 0, "by_field", {"field": "source"})
    assert [sorted({r["source"] for r in p}) for p in parts] == [["cardiology", "neurology"],
                                                               ["endocrinology", "infectious"]]
    assert [len(p) for p in parts] == [40, 40]


def test_by_field_fewer_values_than_clients(sample: list[dict]) -> None:
    with pytest.raises(DataError, match=r"4 distinct values \('cardiology' \(26 rows\).*5 clients.*dirichlet"):
        partition_rows(sample, 5, 0, "by_field")


def test_by_field_groups(sample: list[dict]) -> None:
    groups = [["neurology"], ["cardiology", "infectious"], ["endocrinology"]]
    parts = partition_rows(sample, 3, 0, "by_field", {"groups": groups})
    assert [sorted({r["source"] for r in p}) for p in parts] == [sorted(g) for g in groups]
    assert [len(p) for p in parts] == [14, 48, 18]


@pytest.mark.parametrize(("groups", "error", "message"), [
    ([["cardiology"], ["infectious", "neurology", "endocrinology"]], DataError, r"2 lists but .*num_clients is 3"),
    ([["cardiology"], ["infectious", "neurology"], ["endocrinology", "oncology"]], DataError,
     r"names \['oncology'\].*values found: 'cardiology'"),
    ([["cardiology"], ["infectious"], ["endocrinology"]], DataError, r"values \['neurology'\] belong to no group"),
    ([["cardiology"], ["cardiology", "infectious"], ["neurology", "endocrinology"]], ConfigError, "in two groups"),
    ([["cardiology", "infectious"], [], ["neurology", "endocrinology"]], ConfigError, r"`groups\[1\]` is empty"),
])
def test_by_field_bad_groups(sample: list[dict], groups: list, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        partition_rows(sample, 3, 0, "by_field", {"groups": groups})


def test_empty_client_is_an_error_that_says_how_to_fix_it() -> None:
    rows = labelled({"a": 12})  # one label, tiny alpha: nearly all rows go to one client
    with pytest.raises(DataError, match=r"client \d of 4 got no rows from partitioner 'dirichlet'.*fewer clients"
                                        r".*larger alpha.*another method"):
        partition_rows(rows, 4, 0, "dirichlet", {"field": "label", "alpha": 0.01})


def test_more_clients_than_rows() -> None:
    with pytest.raises(DataError, match="cannot give 5 clients at least one row each from 3 rows"):
        partition_rows(labelled({"a": 3}), 5, 0, "iid")


def test_bad_params_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"partitioner 'dirichlet'.*beta.*Valid: field, alpha"):
        build_partitioner("dirichlet", {"beta": 1})
    assert build_partitioner("dirichlet", {"alpha": "0.3"}).alpha == 0.3  # YAML text coerced


def test_plugin_partitioner_output_is_checked(tmp_path: Path, sample: list[dict]) -> None:
    plugin = tmp_path / "overlap.py"
    plugin.write_text(
        "class Overlap:\n"
        "    def partition(self, rows, num_clients, seed):\n"
        "        return [[0, 1], [1, 2]]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row index 1 of client 1 is given to two clients"):
        partition_rows(sample, 2, 0, f"{plugin}:Overlap")


def test_partition_summary(sample: list[dict]) -> None:
    parts = partition_rows(sample, 2, 0, "by_field")
    summary = partition_summary(parts, "source")
    assert summary == [{"client": 0, "size": 40, "counts": {"cardiology": 26, "neurology": 14}},
                       {"client": 1, "size": 40, "counts": {"infectious": 22, "endocrinology": 18}}]
    assert partition_summary(parts) == [{"client": 0, "size": 40}, {"client": 1, "size": 40}]
    assert partition_summary([[{"x": 1}]], "qtype")[0]["counts"] == {"(missing)": 1}


def test_dirichlet_keeps_every_label_somewhere(sample: list[dict]) -> None:
    parts = partition_rows(sample, 3, 0, "dirichlet", {"alpha": 0.5})
    held = Counter(r["qtype"] for p in parts for r in p)
    assert held == Counter(r["qtype"] for r in sample)
