"""Fast checks of the deployment's pieces: configs, wire format, SecAgg+ error bound, sockets, keys."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography import x509
from flwr.app import ConfigRecord, Message, RecordDict

from fedpeft.cli import main
from fedpeft.config import validate_tree
from fedpeft.data.federated import prepare_data
from fedpeft.deploy import server_command as coordinator
from fedpeft.deploy.counting_grid import CountingGrid
from fedpeft.deploy.launch import CONNECTION, app_pyproject, cli_config
from fedpeft.deploy.records import content_nbytes, record_to_state, state_to_record
from fedpeft.deploy.secagg import error_bound, expected_noise_std
from fedpeft.deploy.settings import SecAggConfig, load_deploy_config
from fedpeft.deploy.site_policy import SiteRefusal
from fedpeft.deploy.trainer_service import ERROR, REASON, TrainerServer, request_training
from fedpeft.deploy.tls import fingerprint, make_node_keys, make_tls_files
from fedpeft.deploy.wire import site_job_from_payload, site_job_payload, site_rows
from fedpeft.errors import ConfigError
from deploy_helpers import tiny_job


def test_state_record_round_trip_keeps_names_shapes_and_float32() -> None:
    state = {"a.lora_A": torch.randn(3, 5, dtype=torch.float64), "b": torch.arange(4.0)}
    back = record_to_state(state_to_record(state))
    assert list(back) == ["a.lora_A", "b"]
    assert all(t.dtype == torch.float32 for t in back.values())
    torch.testing.assert_close(back["a.lora_A"], state["a.lora_A"].float())
    torch.testing.assert_close(back["b"], state["b"])


def test_content_bytes_count_arrays_and_empty_config_values() -> None:
    content = RecordDict({"state": state_to_record({"w": torch.zeros(10)}),
                          "config": ConfigRecord({"s": "", "l": [b"ab", b"c"], "i": 3})})
    # 40 bytes of float32 plus the .npy header and key; config: keys + "" + 3 bytes + one int64
    assert content_nbytes(content) > 40 + len("s") + len("l") + 3 + len("i") + 8


def test_app_pyproject_is_a_valid_flower_app() -> None:
    from flwr.common.config import validate_config

    config = tomllib.loads(app_pyproject({"run-dir": "/x/run"}))
    ok, errors, _ = validate_config(config, check_module=False)
    assert ok, errors
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"] == "fedpeft.deploy.client_app:app"
    assert config["tool"]["flwr"]["app"]["config"] == {"run-dir": "/x/run"}


def test_cli_config_names_one_connection_and_keeps_any_certificate_path(tmp_path) -> None:
    plain = tomllib.loads(cli_config("127.0.0.1:9093", None))
    assert plain == {"superlink": {"default": CONNECTION,
                                   CONNECTION: {"address": "127.0.0.1:9093", "insecure": True}}}
    ca = tmp_path / 'odd "dir" \\ ca.pem'  # quotes and a backslash must survive TOML quoting
    tls = tomllib.loads(cli_config("hub:9093", ca))["superlink"][CONNECTION]
    assert tls == {"address": "hub:9093", "root-certificates": str(ca.resolve())}


def _secaggplus_mean(deltas, weights, settings: SecAggConfig, rng) -> np.ndarray:
    """flwr's SecAgg+ arithmetic without the masks (they cancel): quantise, sum, dequantise."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    q, c, m = settings.quantization_range, settings.clipping_range, settings.max_weight
    ratios = [round(n / m * q) for n in weights]
    np.random.seed(int(rng.integers(2**31)))  # flwr's stochastic rounding draws from np.random
    summed = sum(quantize([d * (r / q)], c, q)[0].astype(np.int64) for d, r in zip(deltas, ratios))
    mean = dequantize([summed], c, q)[0] + (len(deltas) - 1) * -c
    return mean * (q / sum(ratios))


def test_secaggplus_error_is_unbiased_with_the_documented_std_and_within_the_bound() -> None:
    settings = SecAggConfig(enabled=True, clipping_range=0.05, quantization_range=2**22, max_weight=1000)
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 0.01, size=20000).clip(-0.04, 0.04) for _ in range(3)]
    weights = [2, 3, 1]
    err = _secaggplus_mean(deltas, weights, settings, rng) - sum(
        n * d for n, d in zip(weights, deltas)) / sum(weights)
    std = expected_noise_std(settings, weights)
    assert abs(err.mean()) < 5 * std / np.sqrt(err.size)  # unbiased
    assert 0.7 * std < err.std() < 1.3 * std
    bound = error_bound(settings, weights, max_abs_delta=0.04, max_abs_state=0.0)
    assert np.abs(err).max() <= bound
    # a tight max_weight (largest site's count) shrinks the error by its ratio
    tight = SecAggConfig(enabled=True, clipping_range=0.05, max_weight=3)
    assert error_bound(tight, weights, 0.04, 0.0) < bound / 100


def test_deploy_config_lists_every_problem(tmp_path: Path) -> None:
    job = validate_tree(tiny_job({"a": tmp_path / "a", "b": tmp_path / "b", "c": tmp_path / "c"},
                                 tmp_path / "t"))
    path = tmp_path / "deploy.yaml"
    path.write_text(json.dumps({"sites": [{"name": "a"}, {"name": "a", "public_key": "nope.pub"}],
                                "secure_aggregation": {"enabled": True, "quantization_range": 2**31}}))
    with pytest.raises(ConfigError) as err:
        load_deploy_config(path, job)
    text = str(err.value)
    for needle in ("names must be unique", "num_clients is 3", "tls: missing", "have no public_key",
                   "file not found", "mod 2**32"):
        assert needle in text, needle
    assert [p.key for p in err.value.problems] == ["tls", "sites", "sites", "sites", "sites.1.public_key",
                                                    "secure_aggregation.quantization_range"]
    path.write_text(json.dumps({"insecure": True, "authenticate": False,
                                "sites": [{"name": n} for n in "abc"]}))
    assert load_deploy_config(path, job).site_names == ["a", "b", "c"]


@pytest.mark.parametrize("holdout", [False, True])
def test_a_site_builds_the_rows_the_simulation_gives_its_client(sites_and_test, holdout) -> None:
    sites, test = sites_and_test
    job = tiny_job(sites, test)
    job["data"] = {**job["data"], "max_train_samples": 6, "test_ratio": 0.34}  # 2 rows per site
    if holdout:
        del job["data"]["test"]
    cfg = validate_tree(job)
    payload = site_job_payload(cfg)
    assert str(test) not in payload and all(str(p) not in payload for p in sites.values())
    site_cfg, site_holdout = site_job_from_payload(payload)
    assert site_holdout is holdout
    data = prepare_data(cfg)
    assert [len(rows) for rows in data.client_rows] == [2, 2, 2]  # the total cap, shared out
    for i, path in enumerate(sites.values()):
        assert site_rows(site_cfg, path, site_holdout) == data.client_rows[i]


class _FakeGrid:
    """Replies to every message after ``delay_pulls`` pulls, except to node 3 (dead)."""

    def __init__(self, delay_pulls: int) -> None:
        self.delay, self.pulls, self.pushed = delay_pulls, 0, []

    def push_messages(self, messages):
        self.pushed = list(messages)
        return [f"m{i}" for i in range(len(self.pushed))]

    def pull_messages(self, ids):
        self.pulls += 1
        if self.pulls < self.delay:
            return []
        out = []
        for i, msg in enumerate(self.pushed):
            if f"m{i}" in ids and msg.metadata.dst_node_id != 3:
                reply = Message(msg.content, reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
                reply.metadata.__dict__["_reply_to_message_id"] = f"m{i}"
                out.append(reply)
        return out


def test_counting_grid_polls_until_every_reply_or_the_timeout_and_counts_bytes(monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as in a ServerApp
        monkeypatch.setattr(TaskIdentity, attr, value)
    content = RecordDict({"state": state_to_record({"w": torch.zeros(100)})})
    fake = _FakeGrid(delay_pulls=3)
    grid = CountingGrid(fake, poll_s=0.01)
    replies = grid.send_and_receive([Message(content, n, "train") for n in (1, 2)], timeout=5)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2] and fake.pulls == 3
    down, up = grid.take_traffic()
    assert down == up == {1: content_nbytes(content), 2: content_nbytes(content)}
    grid = CountingGrid(_FakeGrid(delay_pulls=1), poll_s=0.01)
    replies = grid.send_and_receive([Message(content, n, "train") for n in (1, 3)], timeout=0.2)
    assert [r.metadata.src_node_id for r in replies] == [1]  # node 3 never answers: timeout
    with pytest.raises(ValueError, match="needs a timeout"):
        grid.send_and_receive([], timeout=None)


def test_trainer_socket_round_trip_and_errors_report_only_their_type(tmp_path: Path) -> None:
    from multiprocessing import AuthenticationError

    def train(config, state):
        if config["fail"] == "data":
            raise FileNotFoundError("/secret/path/of/the/site.jsonl")
        if config["fail"] == "refuse":
            raise SiteRefusal("site 'site-a' refuses the job: ... --allow-remote-code")
        return 7, {"train_loss": 1.5}, "site-a", {k: v + 1 for k, v in state.items()}

    sock, key = tmp_path / "t.sock", tmp_path / "t.key"
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    with TrainerServer(sock, key, train):
        for path in (sock, key):
            assert path.stat().st_mode & 0o077 == 0  # private to the site's user
        header, new = request_training(sock, key, {"fail": ""}, state, 10)
        assert header == {"num_examples": 7, "metrics": {"train_loss": 1.5}, "client_id": "site-a"}
        np.testing.assert_array_equal(new["w"], state["w"] + 1)
        header, _ = request_training(sock, key, {"fail": "data"}, state, 10)
        assert header == {ERROR: "FileNotFoundError"}
        header, _ = request_training(sock, key, {"fail": "refuse"}, state, 10)
        assert header[ERROR] == "SiteRefusal" and "--allow-remote-code" in header[REASON]
        (tmp_path / "wrong.key").write_bytes(b"x" * 32)
        with pytest.raises(AuthenticationError):  # a process without the site's key is refused
            request_training(sock, tmp_path / "wrong.key", {"fail": ""}, state, 10)
        header, _ = request_training(sock, key, {"fail": ""}, state, 10)  # and the service goes on
        assert header["num_examples"] == 7
    assert not sock.exists() and not key.exists()


def test_trainer_messages_are_json_and_safetensors_never_pickles(tmp_path: Path, monkeypatch) -> None:
    import pickle

    def no_pickle(*args, **kwargs):
        raise AssertionError("the trainer socket must not pickle")

    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "dumps", no_pickle)
    monkeypatch.setattr("multiprocessing.reduction.ForkingPickler.loads", no_pickle)
    monkeypatch.setattr("multiprocessing.reduction.ForkingPickler.dumps", no_pickle)
    state = {"w": np.ones(3, dtype=np.float32)}
    with TrainerServer(tmp_path / "t.sock", tmp_path / "t.key", lambda c, s: (1, {}, "a", s)):
        header, new = request_training(tmp_path / "t.sock", tmp_path / "t.key", {}, state, 10)
    assert header["num_examples"] == 1 and new["w"].tolist() == [1.0, 1.0, 1.0]


def test_certs_cover_the_given_hosts_and_key_fingerprints_match_across_formats(tmp_path: Path, capsys) -> None:
    assert main(["certs", str(tmp_path / "certs"), "--host", "hub.example.org", "--host", "10.0.0.5"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"hub.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    assert main(["keys", "site-a", "--out", str(tmp_path / "keys")]) == 0
    keys_out = capsys.readouterr().out
    pub = (tmp_path / "keys" / "site-a.pub").read_bytes()
    assert pub.startswith(b"ecdsa-sha2-nistp384 ") and fingerprint(pub) in keys_out
    assert (tmp_path / "keys" / "site-a").stat().st_mode & 0o077 == 0


def test_coordinator_names_the_fingerprint_of_a_refused_key(tmp_path: Path, caplog) -> None:
    from cryptography.hazmat.primitives import serialization

    keys = make_node_keys(tmp_path, "intruder")
    key = serialization.load_ssh_public_key(keys.public_key.read_bytes())
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    line = ("ERROR :     [/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode with "
            f"public key: {pem!r}, exception: No SuperNode found with the given public key.")
    with caplog.at_level("WARNING"):
        coordinator._report_refusal(line)
    assert f"refused a site whose public key is not registered ({fingerprint(key)})" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # a site of deploy.yaml that came before its registration
        coordinator._report_refusal(line, frozenset({fingerprint(keys.public_key.read_bytes())}))
        coordinator._report_refusal(line, frozenset({"SHA256:another-site"}))
    assert caplog.text.count("refused a site") == 1
    assert make_tls_files(tmp_path / "tls").ca_cert.is_file()


def test_a_site_gives_up_after_repeated_refusals_with_exit_code_3(sites_and_test, tmp_path, monkeypatch):
    from fedpeft.deploy import client_command as site_runner

    calls = []
    monkeypatch.setattr(site_runner, "_RESTART_DELAY_S", 0.0)
    monkeypatch.setattr(site_runner, "_run_once", lambda *a: calls.append(a) or (305, True))
    opts = site_runner.SiteOptions(server="127.0.0.1:1", data=sites_and_test[0]["site-a"], name="site-a",
                                   workspace=tmp_path / "ws", private_key=None)
    assert site_runner.run_site(opts, echo=lambda line: None) == site_runner.EXIT_REFUSED
    assert len(calls) == site_runner._REFUSALS_TOLERATED + 1
    config = tomllib.loads((tmp_path / "ws" / "node-config.toml").read_text())
    assert config["site-name"] == "site-a" and config["trainer-socket"].endswith("trainer.sock")
    assert config["trainer-key"].endswith("trainer.key")


def test_relative_paths_on_server_and_client_are_taken_from_where_the_command_was_typed(
        sites_and_test, tmp_path, monkeypatch) -> None:
    from fedpeft.cli import build_parser
    from fedpeft.deploy import client_command as site_runner

    typed_in = tmp_path / "typed-in"
    (typed_in / "keys").mkdir(parents=True)
    monkeypatch.chdir(typed_in)
    args = build_parser().parse_args(["client", "--server", "h:1", "--data", "site.jsonl", "--name", "a",
                                      "--root-certificates", "keys/ca.crt", "--auth-key", "keys/a",
                                      "--allow-plugin", "p.py:Obj"])
    assert (args.data, args.root_certificates, args.auth_key, args.allow_plugin) == (
        typed_in / "site.jsonl", typed_in / "keys" / "ca.crt", typed_in / "keys" / "a", [typed_in / "p.py:Obj"])
    opts = site_runner.SiteOptions(server="h:1", data=Path("site.jsonl"), name="a", workspace=Path("ws"),
                                   ca_cert=Path("keys/ca.crt"), private_key=Path("keys/a"))
    monkeypatch.chdir(tmp_path)  # Flower runs the SuperNode in the workspace, not where it was typed
    assert (opts.data, opts.workspace, opts.ca_cert, opts.private_key) == (
        typed_in / "site.jsonl", typed_in / "ws", typed_in / "keys" / "ca.crt", typed_in / "keys" / "a")
    argv = site_runner.supernode_argv("h:1", Path("n.toml"), ca_cert=opts.ca_cert, private_key=opts.private_key,
                                      runtime_port=1, retry_for_s=1)
    assert str(typed_in / "keys" / "ca.crt") in argv and str(typed_in / "keys" / "a") in argv

    # The server: the job, deploy.yaml and a data.test override typed relative to the working directory.
    job_dir = tmp_path / "jobs"
    job_dir.mkdir()
    sites, test = sites_and_test
    (job_dir / "job.yaml").write_text(json.dumps({**tiny_job(sites, test), "workspace": str(tmp_path / "runs")}))
    (job_dir / "deploy.yaml").write_text(json.dumps({"insecure": True, "authenticate": False,
                                                     "sites": [{"name": n} for n in ("site-a", "site-b", "site-c")]}))
    (typed_in / "public-test.jsonl").write_text(test.read_text())
    (job_dir / "public-test.jsonl").write_text(test.read_text())  # not the file the user named
    monkeypatch.chdir(typed_in)
    args = build_parser().parse_args(["server", "../jobs/job.yaml", "--deploy", "../jobs/deploy.yaml",
                                      "data.test=public-test.jsonl", "federation.rounds=3"])
    assert args.config == job_dir / "job.yaml" and args.deploy == job_dir / "deploy.yaml"
    cfg, _, run = coordinator.prepare_run("../jobs/job.yaml", "../jobs/deploy.yaml", args.overrides, None)
    run.release()
    assert cfg.data.test == str(typed_in / "public-test.jsonl") and cfg.federation.rounds == 3
    assert f"test: {typed_in / 'public-test.jsonl'}" in (run.path / "config.yaml").read_text()  # the ServerApp reads it


def test_server_overrides_may_follow_deploy() -> None:
    from fedpeft.cli import build_parser

    for argv in (["job.yaml", "--deploy", "d.yaml", "federation.rounds=3", "seed=2"],
                 ["--deploy", "d.yaml", "job.yaml", "federation.rounds=3", "seed=2"],
                 ["job.yaml", "federation.rounds=3", "--deploy", "d.yaml", "seed=2"]):
        args = build_parser().parse_args(["server", *argv])
        assert args.config.name == "job.yaml" and args.deploy.name == "d.yaml"
        assert args.overrides == ["federation.rounds=3", "seed=2"]


def test_a_site_counts_its_supernode_restarts_up_to_the_limit(sites_and_test, tmp_path, monkeypatch, caplog):
    from fedpeft.deploy import client_command as site_runner

    monkeypatch.setattr(site_runner, "_RESTART_DELAY_S", 0.0)
    monkeypatch.setattr(site_runner, "_run_once", lambda *a: (1, False))
    opts = site_runner.SiteOptions(server="127.0.0.1:1", data=sites_and_test[0]["site-a"], name="site-a",
                                   workspace=tmp_path / "ws", restarts=2)
    with caplog.at_level("WARNING"):
        assert site_runner.run_site(opts, echo=lambda line: None) == 1
    assert "(restart 2 of 2)" in caplog.text and "3 of 2" not in caplog.text
    assert "giving up after 2 restarts" in caplog.text


def test_a_round_waits_at_most_its_timeout_over_every_secagg_stage(monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.deploy import counting_grid

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    clock = [0.0]  # a fake clock: the waits are counted, not slept
    monkeypatch.setattr(counting_grid.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(counting_grid.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    content = RecordDict({"state": state_to_record({"w": torch.zeros(4)})})
    grid = CountingGrid(_FakeGrid(delay_pulls=1), poll_s=0.5, stage_grace_s=2.0)
    with grid.round_deadline(40.0):  # node 3 died: each of SecAgg+'s 4 stages asks for 40 s
        for stage in range(4):
            replies = grid.send_and_receive([Message(content, n, "train") for n in (1, 3)], timeout=40.0)
            assert [r.metadata.src_node_id for r in replies] == [1]  # the survivor is never lost
    assert clock[0] == 40.0 + 3 * 2.0  # not 4 x 40 s: one deadline, then a short grace per stage
    clock[0] = 0.0
    replies = grid.send_and_receive([Message(content, n, "train") for n in (1, 3)], timeout=5.0)
    assert clock[0] == 5.0 and len(replies) == 1  # outside a round: the caller's timeout


def test_a_site_that_never_reaches_the_server_gives_up_after_retry_for(sites_and_test, tmp_path, monkeypatch,
                                                                       caplog):
    from fedpeft.deploy import client_command as site_runner

    clock = [0.0]
    monkeypatch.setattr(site_runner.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(site_runner, "_RESTART_DELAY_S", 0.0)
    left = []

    def run_once(opts, node_config, stop, echo, contact):  # each SuperNode waits out what is left, then exits
        left.append(opts.retry_for_s - (clock[0] - contact[0]))
        clock[0] += 4.0
        return 1, False

    monkeypatch.setattr(site_runner, "_run_once", run_once)
    opts = site_runner.SiteOptions(server="127.0.0.1:1", data=sites_and_test[0]["site-a"], name="site-a",
                                   workspace=tmp_path / "ws", retry_for_s=10.0)
    with caplog.at_level("ERROR"):
        assert site_runner.run_site(opts, echo=lambda line: None) == 1
    assert left == [10.0, 6.0, 2.0]  # three SuperNodes, 12 s in all; not 21 restarts
    assert "no contact with the server at 127.0.0.1:1 for 12 s (--retry-for 10)" in caplog.text


def test_a_workspace_too_long_for_a_unix_socket_gets_a_short_private_socket_folder(tmp_path):
    from fedpeft.deploy.client_command import trainer_socket_path
    from fedpeft.deploy.trainer_service import MAX_SOCKET_PATH

    short = trainer_socket_path(tmp_path / "ws")
    assert short == tmp_path / "ws" / "trainer.sock"
    long = trainer_socket_path(tmp_path / ("x" * 120))
    assert len(str(long)) <= MAX_SOCKET_PATH and oct(long.parent.stat().st_mode & 0o777) == "0o700"
    long.parent.rmdir()

