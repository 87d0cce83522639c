"""The deployment's round loop with the sites in-process (no Flower): equality, retry, resume.

:class:`InProcessSites` stands in for :class:`~fedpeft.deploy.transport.FlowerTransport`:
each site is a real :class:`~fedpeft.deploy.site_training.SiteTrainer` on its own file, so these tests
check everything but the network in seconds.
"""

from __future__ import annotations

import json

import pytest
import torch

from fedpeft.config import CompressionConfig, validate_tree
from fedpeft.deploy import constants as C
from fedpeft.deploy.flower_pool import FlowerPool, serve
from fedpeft.compression.link import Link
from fedpeft.fold import Fold
from fedpeft.deploy.settings import DeployConfig
from fedpeft.deploy.site_training import SiteTrainer
from fedpeft.errors import RoundError
from fedpeft.io_utils import read_jsonl
from fedpeft.run_dir import RunDir
from fedpeft.state import ClientReport, ClientUpdate, RoundResult
from deploy_helpers import checkpoint, max_abs_diff, simulate, tiny_job, torch_threads


class InProcessSites:
    """Sites as local trainers; ``down`` names the sites that fail in a given round."""

    def __init__(self, sites: dict, down: dict[int, set[str]] | None = None) -> None:
        self.trainers = {name: SiteTrainer(name, path) for name, path in sites.items()}
        self.down = down or {}
        self.jobs: list[str] = []

    def connected(self) -> list[str]:
        return list(self.trainers)

    def train(self, rnd, tasks, state, job, fold=None, link=None) -> RoundResult:  # returns updates: the loop folds them
        self.jobs.append(job)
        link = link or Link.from_config(CompressionConfig())
        updates, reports, dropped = [], [], []
        for task in tasks:
            if task.name in self.down.get(rnd, set()):
                dropped.append({"client": task.name, "reason": "crashed"})
                continue
            view = link.broadcast(state, task.rank)  # as FlowerTransport sends it
            payload = view.payload or {k: v.numpy() for k, v in view.start.items()}
            config = {C.KEY_SITE: task.name, C.KEY_SEED: task.seed, C.KEY_JOB: job, C.KEY_SERVER_ROUND: rnd,
                      **({} if task.rank is None else {C.KEY_RANK: task.rank})}
            n, metrics, _, new = self.trainers[task.name].train(config, payload)
            received = link.rebuild(new, state, task.rank)
            updates.append(ClientUpdate(task.name, received, n, metrics))
            reports.append(ClientReport(task.name, n, metrics, bytes_down=1, bytes_up=2))
        return RoundResult(reports, updates=updates, dropped=dropped)


def _deploy(sites: dict, **extra) -> DeployConfig:
    return DeployConfig(insecure=True, authenticate=False, sites=[{"name": n} for n in sites],
                        wait_for_sites_s=1, round_retries=1, **extra)


def _serve(job: dict, workspace, run_id: str, transport, dep: DeployConfig) -> RunDir:
    cfg = validate_tree({**job, "workspace": str(workspace), "run_id": run_id})
    run = RunDir.create(cfg)
    with torch_threads(1):
        serve(cfg, dep, run, transport)
    return run


def test_sampled_rounds_match_the_simulation_bit_for_bit(sites_and_test, tmp_path):
    sites, test = sites_and_test
    job = tiny_job(sites, test, clients_per_round=2, min_clients=1)  # sampling and seeds matter
    sim = simulate(job, tmp_path)
    transport = InProcessSites(sites)
    run = _serve(job, tmp_path, "deploy", transport, _deploy(sites))
    for rnd in (1, 2):
        a, b = checkpoint(sim.path, rnd), checkpoint(run.path, rnd)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rnd
    sim_rounds = [r for r in read_jsonl(sim.metrics_file) if r["event"] == "round"]
    dep_rounds = read_jsonl(run.metrics_file)
    for s, d in zip(sim_rounds, dep_rounds, strict=True):
        assert [c["train_loss"] for c in s["clients"]] == [c["train_loss"] for c in d["clients"]]
        assert len(d["clients"]) == 2 and d["bytes_down"] == 2 and d["bytes_up"] == 4
    assert json.loads(transport.jobs[0])["data"].keys().isdisjoint({"train", "test", "client_files"})
    expected = {"config.yaml", "metrics.jsonl", "checkpoints", "adapter", "summary.json",
                "partitions.json", "predictions.jsonl"}
    assert expected <= {p.name for p in run.path.iterdir()}
    summary = run.read_summary()
    assert summary["runtime"] == "flower" and summary["final"].keys() == sim.read_summary()["final"].keys()


def test_round_below_min_clients_is_retried_then_stops_and_a_restart_resumes(sites_and_test, tmp_path):
    sites, test = sites_and_test
    job = tiny_job(sites, test)  # min_clients=2 of 3
    # Round 2: two sites down on both attempts -> the run stops after round 1.
    broken = InProcessSites(sites, down={2: {"site-a", "site-c"}})
    with pytest.raises(RoundError, match=r"round 2/2: fewer than min_clients=2.*last completed round is 1"):
        _serve(job, tmp_path, "deploy", broken, _deploy(sites))
    run = RunDir(tmp_path / job["job"] / "deploy")
    assert (run.path / "checkpoints" / "latest").read_text().strip() == "round-0001"
    assert [r["round"] for r in read_jsonl(run.metrics_file)] == [1]
    # A restarted server goes on from round 2 and ends where an uninterrupted run ends.
    cfg = validate_tree({**job, "workspace": str(tmp_path), "run_id": "deploy"})
    with torch_threads(1):
        serve(cfg, _deploy(sites), run, InProcessSites(sites))
    uninterrupted = simulate(job, tmp_path, "sim")
    a, b = checkpoint(uninterrupted.path, 2), checkpoint(run.path, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["round"] for r in read_jsonl(run.metrics_file)] == [1, 2]


def test_a_site_that_drops_out_is_recorded_and_the_round_goes_on(sites_and_test, tmp_path):
    sites, test = sites_and_test
    run = _serve(tiny_job(sites, test), tmp_path, "deploy", InProcessSites(sites, down={2: {"site-b"}}),
                 _deploy(sites))
    last = read_jsonl(run.metrics_file)[-1]
    assert [c["client_id"] for c in last["clients"]] == ["site-a", "site-c"]
    assert last["dropped"] == [{"client": "site-b", "reason": "crashed"}]


def test_round_tasks_give_each_site_its_simulation_index_and_seed(sites_and_test, tmp_path):
    from fedpeft.rounds import client_seed

    sites, test = sites_and_test
    cfg = validate_tree({**tiny_job(sites, test), "workspace": str(tmp_path)})
    seen = []

    class Recorder:
        def connected(self):
            return list(sites)

        def train(self, rnd, tasks, state, job, fold, link):
            seen.extend(tasks)
            return RoundResult([ClientReport(t.name, 1) for t in tasks], updates=[])

    FlowerPool(cfg, _deploy(sites), RunDir.create(cfg), Recorder()).train(2, list(sites), {}, Fold({}, list(sites)))
    assert [(t.name, t.index, t.seed) for t in seen] == [
        (name, i, client_seed(cfg, 2, i)) for i, name in enumerate(sites)]


class NanSite(InProcessSites):
    """``site-b`` answers every round with a NaN update."""

    def train(self, rnd, tasks, state, job, fold=None, link=None) -> RoundResult:
        result = super().train(rnd, tasks, state, job)
        for update in result.updates:
            if update.client_id == "site-b":
                update.state = {k: torch.full_like(v, float("nan")) for k, v in update.state.items()}
        return result


def test_a_site_sending_nan_is_dropped_with_its_reason_and_the_adapter_stays_finite(sites_and_test, tmp_path):
    sites, test = sites_and_test
    run = _serve(tiny_job(sites, test), tmp_path, "deploy", NanSite(sites), _deploy(sites))
    for record in read_jsonl(run.metrics_file):
        assert [c["client_id"] for c in record["clients"]] == ["site-a", "site-c"]
        (dropped,) = record["dropped"]
        assert dropped["client"] == "site-b" and "non-finite" in dropped["reason"]
    assert all(torch.isfinite(v).all() for v in checkpoint(run.path, 2).values())


def test_server_resume_adds_rounds_only_with_allow_config_change(sites_and_test, tmp_path):
    from fedpeft.cli import build_parser
    from fedpeft.errors import CheckpointError

    sites, test = sites_and_test
    job = {**tiny_job(sites, test), "eval": {**tiny_job(sites, test)["eval"], "every": 0}}
    run = _serve(job, tmp_path, "deploy", InProcessSites(sites), _deploy(sites))
    more = validate_tree({**job, "workspace": str(tmp_path), "run_id": "deploy",
                          "federation": {**job["federation"], "rounds": 3}})
    with pytest.raises(CheckpointError, match="federation.rounds"):
        serve(more, _deploy(sites), run, InProcessSites(sites))
    with torch_threads(1):
        serve(more, _deploy(sites), run, InProcessSites(sites), ("federation.rounds",))
    assert [r["round"] for r in read_jsonl(run.metrics_file)] == [1, 2, 3]
    args = build_parser().parse_args(["server", "--resume", "r", "--allow-config-change", "federation.rounds"])
    assert args.allow_config_change == ["federation.rounds"]


class ReversedStreamingSites(InProcessSites):
    """Streams each update into the round's fold, last sampled site first (out of sampled order)."""

    def train(self, rnd, tasks, state, job, fold=None, link=None) -> RoundResult:
        result = super().train(rnd, tasks, state, job)
        accepted = {u.client_id for u in reversed(result.updates) if fold.add(u) is None}
        return RoundResult([r for r in result.reports if r.client_id in accepted], dropped=result.dropped)


@pytest.mark.parametrize("aggregation", [
    {"name": "fedavgm", "beta": 0.5}, {"name": "median"}, {"name": "trimmed_mean", "trim": 0.34},
    {"name": "norm_bounded", "max_norm": 1e-3}, {"name": "svd"}])
def test_every_rule_streamed_out_of_order_equals_the_simulation_bit_for_bit(sites_and_test, tmp_path, aggregation):
    sites, test = sites_and_test
    job = tiny_job(sites, test, aggregation=aggregation)
    sim = simulate(job, tmp_path)
    run = _serve(job, tmp_path, "deploy", ReversedStreamingSites(sites), _deploy(sites))
    for rnd in (1, 2):
        a, b = checkpoint(sim.path, rnd), checkpoint(run.path, rnd)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rnd
    assert [len(r["clients"]) for r in read_jsonl(run.metrics_file)] == [3, 3]
    if aggregation["name"] != "fedavgm":  # the rule changed the result
        plain = simulate({**job, "federation": {**job["federation"], "aggregation": {"name": "fedavg"}}},
                         tmp_path, "plain")
        a, b = checkpoint(sim.path, 1), checkpoint(plain.path, 1)
        assert any(not torch.equal(a[k], b[k]) for k in a)


def test_secure_aggregation_with_a_rule_reading_each_update_is_a_deploy_config_error(sites_and_test, tmp_path):
    from fedpeft.deploy.settings import load_deploy_config
    from fedpeft.errors import ConfigError

    sites, test = sites_and_test
    cfg = validate_tree({**tiny_job(sites, test, aggregation={"name": "median"}), "workspace": str(tmp_path)})
    path = tmp_path / "deploy.yaml"
    path.write_text("insecure: true\nauthenticate: false\nsecure_aggregation:\n  enabled: true\nsites:\n"
                    + "".join(f"  - name: {n}\n" for n in sites))
    with pytest.raises(ConfigError, match=r"deploy.yaml:4: secure_aggregation.enabled.*'median' must see each site"):
        load_deploy_config(path, cfg)


@pytest.mark.parametrize("codecs", [{"up": {"name": "nf4"}, "down": {"name": "fp16"}},
                                    {"up": {"name": "topk", "fraction": 0.1}}])
def test_compressed_rounds_equal_the_simulation_bit_for_bit(sites_and_test, tmp_path, codecs):
    sites, test = sites_and_test
    job = tiny_job(sites, test, compression=codecs)
    sim = simulate(job, tmp_path)
    run = _serve(job, tmp_path, "deploy", InProcessSites(sites), _deploy(sites))
    plain = simulate({**job, "federation": {k: v for k, v in job["federation"].items() if k != "compression"}},
                     tmp_path, "plain")
    for rnd in (1, 2):  # the sites' codec and residuals (top-k) give the simulation's adapter
        a, b = checkpoint(sim.path, rnd), checkpoint(run.path, rnd)
        assert all(torch.equal(a[k], b[k]) for k in a), rnd
    a, b = checkpoint(sim.path, 2), checkpoint(plain.path, 2)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the codec changed the result...
    assert max_abs_diff(a, b) < 0.05  # ...a little


@pytest.mark.parametrize("aggregation", ["fedavg", "svd"])
def test_heterogeneous_ranks_equal_the_simulation_bit_for_bit(sites_and_test, tmp_path, aggregation):
    sites, test = sites_and_test  # peft.r = 4: the sites train ranks 1, 2 and 4
    job = tiny_job(sites, test, client_ranks=[1, 2, 4], aggregation={"name": aggregation},
                   compression={"up": {"name": "int8", "block_size": 8}})
    sim = simulate(job, tmp_path)
    transport = InProcessSites(sites)
    run = _serve(job, tmp_path, "deploy", transport, _deploy(sites))
    for rnd in (1, 2):
        a, b = checkpoint(sim.path, rnd), checkpoint(run.path, rnd)
        assert all(torch.equal(a[k], b[k]) for k in a), rnd


def test_a_rank_in_deploy_yaml_wins_over_client_ranks_and_is_checked(sites_and_test, tmp_path):
    from fedpeft.deploy.settings import load_deploy_config, site_ranks
    from fedpeft.errors import ConfigError

    sites, test = sites_and_test
    cfg = validate_tree({**tiny_job(sites, test, client_ranks=[2, 2, 2]), "workspace": str(tmp_path)})
    path = tmp_path / "deploy.yaml"
    names = list(sites)
    path.write_text("insecure: true\nauthenticate: false\nsites:\n"
                    f"  - {{name: {names[0]}, rank: 1}}\n  - {{name: {names[1]}}}\n  - {{name: {names[2]}, rank: 9}}\n")
    with pytest.raises(ConfigError, match=r"deploy.yaml:6: sites.2.rank: site .* rank 9 is above peft.r \(4\)"):
        load_deploy_config(path, cfg)
    path.write_text(path.read_text().replace("rank: 9", "rank: 4"))
    assert site_ranks(load_deploy_config(path, cfg), cfg) == [1, 2, 4]
