"""Fixtures of the deployment tests: three sites' files and the simulation to compare with."""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_helpers import simulate, tiny_job, write_sites

from fedpeft.run_dir import RunDir


@pytest.fixture(scope="session")
def sites_and_test(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    return write_sites(tmp_path_factory.mktemp("site-data"))


@pytest.fixture(scope="session")
def simulation(sites_and_test, tmp_path_factory) -> RunDir:
    """The simulation every deployment test compares with (run once)."""
    sites, test = sites_and_test
    return simulate(tiny_job(sites, test), tmp_path_factory.mktemp("sim-ws"))
