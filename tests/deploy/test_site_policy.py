"""A site runs only the code its own command line allowed, whatever job the server sends."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict

from fedpeft.cli import build_parser
from fedpeft.config import validate_tree
from fedpeft.deploy import client_app
from fedpeft.deploy import constants as C
from fedpeft.deploy.client_command import SiteOptions, _LazyTrainer
from fedpeft.deploy.records import state_to_record
from fedpeft.deploy.site_policy import SitePolicy, SiteRefusal, check_job
from fedpeft.deploy.site_training import SiteTrainer
from fedpeft.deploy.trainer_service import TrainerServer
from fedpeft.deploy.transport import _reason
from fedpeft.deploy.wire import site_job_from_payload, site_job_payload
from fedpeft.errors import ConfigError
from deploy_helpers import tiny_job

# A PEFT method plugin that leaves a mark when imported: importing it is running it.
PLUGIN = '''from pathlib import Path
Path(__file__).with_name("imported.marker").touch()
from fedpeft.peft_methods.lora import LoRA as MyLora
'''


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "plugins" / "my_lora.py"
    path.parent.mkdir()
    path.write_text(PLUGIN)
    return path


def _payload(sites_and_test, **changes: dict) -> str:
    """The job text a coordinator sends, with ``changes`` merged into its sections."""
    sites, test = sites_and_test
    job = tiny_job(sites, test)
    job["train"] = {**job["train"], "max_steps": 1}
    payload = json.loads(site_job_payload(validate_tree(job)))
    for section, values in changes.items():
        payload[section] = {**payload.get(section, {}), **values}  # a coordinator may add sections
    return json.dumps(payload)


def _config(job: str) -> dict:
    return {C.KEY_SITE: "site-a", C.KEY_SEED: 1, C.KEY_SERVER_ROUND: 1, C.KEY_JOB: job, C.KEY_TIMEOUT: 60.0}


def _state(sites_and_test) -> dict[str, np.ndarray]:
    """The tiny job's initial adapter state (what the server would send)."""
    from fedpeft.adapters import get_trainable_state
    from fedpeft.deploy.site_training import build_worker  # the core's, as the site builds it

    cfg, _ = site_job_from_payload(_payload(sites_and_test))
    return {k: v.numpy() for k, v in get_trainable_state(build_worker(cfg, "cpu").model).items()}


def test_remote_code_is_refused_unless_the_site_allows_it(sites_and_test) -> None:
    cfg, _ = site_job_from_payload(_payload(sites_and_test, model={"trust_remote_code": True}))
    with pytest.raises(SiteRefusal) as refusal:
        check_job(cfg, SitePolicy(), "site-a")
    assert "model.trust_remote_code" in str(refusal.value) and "--allow-remote-code" in str(refusal.value)
    check_job(cfg, SitePolicy.from_flags(allow_remote_code=True), "site-a")
    check_job(site_job_from_payload(_payload(sites_and_test))[0], SitePolicy(), "site-a")  # no code asked


def test_a_plugin_is_allowed_only_as_the_very_file_the_site_named(sites_and_test, plugin, tmp_path,
                                                                   monkeypatch) -> None:
    job = _payload(sites_and_test, peft={"method": f"{plugin}:MyLora"})
    cfg, _ = site_job_from_payload(job)
    with pytest.raises(SiteRefusal) as refusal:
        check_job(cfg, SitePolicy(), "site-a")
    assert f"peft.method '{plugin}:MyLora'" in str(refusal.value)
    assert f"--allow-plugin {plugin}" in str(refusal.value)
    impostor = tmp_path / "elsewhere" / "my_lora.py"  # same name, another file
    impostor.parent.mkdir()
    impostor.write_text(PLUGIN)
    with pytest.raises(SiteRefusal):
        check_job(cfg, SitePolicy.from_flags(plugins=[impostor]), "site-a")
    os.symlink(plugin.parent, tmp_path / "link")  # the same file by another path: real paths compare
    check_job(cfg, SitePolicy.from_flags(plugins=[tmp_path / "link" / "my_lora.py:MyLora"]), "site-a")
    monkeypatch.chdir(tmp_path)  # a relative name resolves as the registry resolves it
    relative, _ = site_job_from_payload(_payload(sites_and_test, peft={"method": "plugins/my_lora.py:MyLora"},
                                                 federation={"aggregation": {"name": "plugins/my_lora.py"}}))
    check_job(relative, SitePolicy.from_flags(plugins=["plugins/my_lora.py"]), "site-a")
    with pytest.raises(SiteRefusal, match="federation.aggregation.name"):  # every registry name counts
        check_job(relative, SitePolicy(), "site-a")
    with pytest.raises(ConfigError, match="--allow-plugin"):
        SitePolicy.from_flags(plugins=["missing.py"])
    assert not (plugin.parent / "imported.marker").exists()


@pytest.mark.parametrize("asks", ["remote code", "plugin"])
def test_the_site_trainer_refuses_before_loading_anything_and_trains_when_allowed(sites_and_test, plugin,
                                                                                   asks) -> None:
    sites, _ = sites_and_test
    if asks == "plugin":
        job, policy = _payload(sites_and_test, peft={"method": f"{plugin}:MyLora"}), SitePolicy.from_flags(
            plugins=[plugin])
    else:
        job, policy = _payload(sites_and_test, model={"trust_remote_code": True}), SitePolicy.from_flags(True)
    state = _state(sites_and_test)
    refusing = SiteTrainer("site-a", sites["site-a"])
    with pytest.raises(SiteRefusal):
        refusing.train(_config(job), state)
    assert refusing._worker is None and not (plugin.parent / "imported.marker").exists()
    n, metrics, _, new = SiteTrainer("site-a", sites["site-a"], policy=policy).train(_config(job), state)
    assert n > 0 and metrics["steps"] == 1 and new.keys() == state.keys()
    assert (plugin.parent / "imported.marker").exists() is (asks == "plugin")


def test_the_refusal_reaches_the_server_as_the_failed_replys_reason(sites_and_test, tmp_path, monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as in a Flower process
        monkeypatch.setattr(TaskIdentity, attr, value)
    sites, _ = sites_and_test
    sock, key = tmp_path / "t.sock", tmp_path / "t.key"
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config={
        C.NODE_SITE_NAME: "site-a", C.NODE_DATA_PATH: str(sites["site-a"]),
        C.NODE_TRAINER_SOCKET: str(sock), C.NODE_TRAINER_KEY: str(key)})
    job = _payload(sites_and_test, model={"trust_remote_code": True})
    content = RecordDict({C.RECORD_STATE: state_to_record({}), C.RECORD_CONFIG: ConfigRecord(_config(job))})
    msg = Message(content, 7, "train")
    with TrainerServer(sock, key, SiteTrainer("site-a", sites["site-a"]).train):
        with pytest.raises(client_app.SiteFailure) as failure:
            client_app.train(msg, context)
    assert "site 'site-a' refuses the job" in str(failure.value) and "--allow-remote-code" in str(failure.value)
    # what Flower's run_clientapp makes of the exception, and what the server reads back from it
    ex = failure.value
    reply = Message(Error(code=0, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=msg)
    assert _reason(reply) == str(ex)


def test_the_allowance_comes_from_fedpeft_clients_own_flags(tmp_path, plugin, monkeypatch) -> None:
    from fedpeft.deploy import client_command

    seen: list[SiteOptions] = []
    monkeypatch.setattr(client_command, "run_site", lambda opts: seen.append(opts) or 0)
    args = build_parser().parse_args(["client", "--server", "h:1", "--data", "d.jsonl", "--name", "a",
                                      "--insecure", "--allow-remote-code", "--allow-plugin", str(plugin),
                                      "--allow-plugin", f"{plugin}:MyLora"])
    assert args.fn(args) == 0
    assert seen[0].policy() == SitePolicy(True, frozenset({plugin.resolve()}))
    trainer = _LazyTrainer(SiteOptions(server="h:1", data=tmp_path / "d.jsonl", name="a", workspace=tmp_path,
                                       allow_plugins=(plugin,))).get()
    assert trainer.policy == SitePolicy(False, frozenset({plugin.resolve()}))
    args = build_parser().parse_args(["client", "--server", "h:1", "--data", "d", "--name", "a", "--insecure"])
    assert args.fn(args) == 0 and seen[1].policy() == SitePolicy()


def _dp_job(privacy: dict, **federation):
    from fedpeft.config import validate_tree

    return validate_tree({"privacy": privacy, "federation": {"num_clients": 3, "rounds": 4, **federation},
                          "train": {"batch_size": 4, "max_steps": 5}})


def test_a_site_refuses_a_job_over_its_max_epsilon_or_without_secure_aggregation():
    from fedpeft.deploy.site_policy import SitePolicy, SiteRefusal, check_privacy
    from fedpeft.privacy.ledger import site_epsilon

    strict = SitePolicy(max_epsilon=8.0)
    with pytest.raises(SiteRefusal, match=r"epsilon inf .*--max-epsilon 8"):  # no DP at all
        check_privacy(_dp_job({"level": "none"}), strict, "a", secure=True, num_examples=40, shares=3)
    weak = _dp_job({"level": "example", "noise_multiplier": 0.3})
    with pytest.raises(SiteRefusal, match=r"would spend epsilon \d+.*at most --max-epsilon 8"):
        check_privacy(weak, strict, "a", secure=True, num_examples=40, shares=3)
    check_privacy(_dp_job({"level": "example", "target_epsilon": 8.0}), strict, "a", secure=False,
                  num_examples=40, shares=3)  # calibrated on this site to 8: allowed
    # Client level: without SecAgg+ the coordinator sees this site's update with 1/sqrt(3) of the noise.
    client = _dp_job({"level": "client", "noise_multiplier": 2.0})
    assert site_epsilon(client, 40, 3, secure=False) > site_epsilon(client, 40, 3, secure=True)
    limit = SitePolicy(max_epsilon=site_epsilon(client, 40, 3, secure=True) * 1.01)
    check_privacy(client, limit, "a", secure=True, num_examples=40, shares=3)
    with pytest.raises(SiteRefusal, match="--max-epsilon"):
        check_privacy(client, limit, "a", secure=False, num_examples=40, shares=3)
    with pytest.raises(SiteRefusal, match="requires secure aggregation"):
        check_privacy(client, SitePolicy(require_secure_aggregation=True), "a", secure=False, num_examples=40,
                      shares=3)


def test_client_flags_make_the_privacy_policy():
    from fedpeft.cli import build_parser
    from fedpeft.errors import ConfigError

    args = build_parser().parse_args(["client", "--server", "h:1", "--data", "d.jsonl", "--name", "a", "--insecure",
                                      "--max-epsilon", "8", "--require-secure-aggregation"])
    assert args.max_epsilon == 8.0 and args.require_secure_aggregation
    with pytest.raises(ConfigError, match="--max-epsilon -1"):
        SitePolicy.from_flags(max_epsilon=-1)
