"""How the server reaches the sites over Flower: who is connected, and one round of training.

:class:`FlowerTransport` is the only server code that touches Flower messages. It maps Flower
node ids to site names (from key registration with authentication, else by asking each new
node its name), sends each sampled site its task, and returns the round's updates in site-index
order (plain) or only their weighted mean (SecAgg+), with the bytes each site sent and received.
The client pool (:mod:`fedpeft.deploy.flower_pool`) sees only a :class:`~fedpeft.state.RoundResult`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedpeft.constants import KEY_CLIENT_ID, KEY_NUM_EXAMPLES
from fedpeft.deploy import constants as C
from fedpeft.deploy.counting_grid import CountingGrid
from fedpeft.deploy.records import arrays_to_record, record_to_state, state_to_record
from fedpeft.errors import AggregationError
from fedpeft.deploy.settings import DeployConfig

if TYPE_CHECKING:  # torch: imported when the first round starts, not before sites are asked
    from fedpeft.compression.link import Link
    from fedpeft.fold import Fold
    from fedpeft.state import RoundResult, State

log = logging.getLogger(__name__)

_QUERY_TIMEOUT_S = 60.0
_WAIT_POLL_S = 2.0


@dataclass(frozen=True)
class SiteTask:
    """One sampled site's work in one round: its index in ``sites`` and its training seed."""

    name: str
    index: int
    seed: int
    rank: int | None = None  # federation.client_ranks[index]


class Transport(Protocol):
    """What the round loop needs from a runtime."""

    def connected(self) -> list[str]:
        """Names of the configured sites that are connected now."""
        ...

    def train(self, rnd: int, tasks: list[SiteTask], state: State, job: str, fold: Fold, link: Link) -> RoundResult:
        """Have each site of ``tasks`` train from ``state``; add each update to ``fold`` as it comes.

        ``link`` encodes the broadcast and decodes the updates (the job's compression).
        """
        ...

    def evaluate(self, rnd: int, sites: list[str], state: State | None, job: str,
                 seeds: dict[str, int] | None = None) -> dict[str, dict]:
        """Have each of ``sites`` score ``state`` on its own held-out slice; ``{site: scores}``."""
        ...


def wait_for_sites(transport: Transport, wanted: list[str], need: int, timeout_s: float,
                   want_all: bool) -> list[str]:
    """Wait until every wanted site (or, unless ``want_all``, at least ``need``) is connected.

    Returns:
        The wanted sites connected when the wait ended (bounded by ``timeout_s``).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        present = [n for n in wanted if n in set(transport.connected())]
        if len(present) == len(wanted) or (not want_all and len(present) >= need):
            return present
        if time.monotonic() >= deadline:
            return present
        time.sleep(_WAIT_POLL_S)


class FlowerTransport:
    """Sites over a Flower ``Grid``.

    Args:
        grid: The ServerApp's grid (wrapped to poll faster and count bytes).
        context: The ServerApp's context (SecAgg+ needs its run id).
        dep: The deployment config (site names, SecAgg+, timeouts).
        registered: JSON file of site name -> node id of the sites registered with their keys
            (authentication; read once it exists, as the coordinator registers them while the
            ServerApp starts); ``None`` asks every new node for its name instead.
    """

    def __init__(self, grid, context: Context, dep: DeployConfig, registered: Path | None = None) -> None:
        self.grid = CountingGrid(grid, poll_s=dep.poll_s)
        self.context = context
        self.dep = dep
        self.node_of: dict[str, int] = {}
        self.registered = registered
        self.refused: set[int] = set()
        self.asked: dict[int, float] = {}  # node id -> when it was last asked its name
        self.seen: set[str] = set()  # registered sites online at the last look
        self._lock = threading.Lock()  # connected() may run in a prefetch thread

    # ------------------------------------------------------------------ who is there

    def connected(self) -> list[str]:
        """Connected configured sites; asks new nodes their name first (without authentication)."""
        with self._lock:
            online = set(self.grid.get_node_ids())
            if self.registered is not None:
                if not self.node_of and self.registered.is_file():
                    self.node_of = {str(k): int(v) for k, v in json.loads(self.registered.read_text()).items()}
                present = [n for n in self.dep.site_names if self.node_of.get(n) in online]
                for name in set(present) - self.seen:
                    log.info("site %s connected (node %d, registered key)", name, self.node_of[name])
                self.seen = set(present)
                return present
            known = set(self.node_of.values()) | self.refused
            recent = {n for n, t in self.asked.items() if time.monotonic() - t < _QUERY_TIMEOUT_S * 2}
            if online - known - recent:
                self._identify(sorted(online - known - recent))
            return [n for n in self.dep.site_names if self.node_of.get(n) in online]

    def _identify(self, node_ids: list[int]) -> None:
        content = RecordDict({C.RECORD_CONFIG: ConfigRecord({C.KEY_QUERY: C.QUERY_SITE_NAME})})
        msgs = [Message(content, nid, MessageType.QUERY, ttl=_QUERY_TIMEOUT_S + 60) for nid in node_ids]
        self.asked.update({nid: time.monotonic() for nid in node_ids})
        for reply in self.grid.send_and_receive(msgs, timeout=_QUERY_TIMEOUT_S):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %d did not say which site it is: %s", nid, _reason(reply))
                continue
            name = str(reply.content.config_records[C.RECORD_CONFIG][C.KEY_SITE])
            if name not in self.dep.site_names:
                log.warning("refused a site named %r (node %d): not one of the sites in deploy.yaml "
                            "(%s)", name, nid, ", ".join(self.dep.site_names))
                self.refused.add(nid)
            elif name in self.node_of and self.node_of[name] in set(self.grid.get_node_ids()):
                log.warning("refused a second site named %r (node %d): site %r is already connected "
                            "as node %d", name, nid, name, self.node_of[name])
                self.refused.add(nid)
            else:
                log.info("site %s connected (node %d)", name, nid)
                self.node_of[name] = nid
        self.grid.take_traffic()  # identification is not part of any round's traffic

    # ------------------------------------------------------------------ one round

    def train(self, rnd: int, tasks: list[SiteTask], state: State, job: str, fold: Fold, link: Link) -> RoundResult:
        """One round: plain (each update into ``fold`` as it arrives) or SecAgg+ (only their mean)."""
        self.grid.take_traffic()
        with self.grid.round_deadline(self.dep.round_timeout_s):  # SecAgg+'s 4 stages included
            if self.dep.secure_aggregation.enabled:
                result = self._train_secure(rnd, tasks, state, job)
            else:
                result = self._train_plain(rnd, tasks, state, job, fold, link)
        down, up = self.grid.take_traffic()
        for report in result.reports:
            nid = self.node_of[report.client_id]
            report.bytes_down, report.bytes_up = down.get(nid, 0), up.get(nid, 0)
        return result

    def evaluate(self, rnd: int, sites: list[str], state: State | None, job: str,
                 seeds: dict[str, int] | None = None) -> dict[str, dict]:
        """Have each of ``sites`` score ``state`` (``None``: the base model) on its own slice.

        ``seeds``: each site's personalisation seed (``eval.site_finetune_steps``).

        Returns:
            ``{site: {n, metric: value}}`` of the sites that answered within the round timeout
            (a site that fails or stays silent is logged and left out).
        """
        from fedpeft.site_scores import KEY_N

        config = {C.KEY_SERVER_ROUND: rnd, C.KEY_JOB: job, C.KEY_TIMEOUT: self.dep.round_timeout_s,
                  C.KEY_ZERO_SHOT: state is None}
        record = state_to_record(state or {})
        seeds = seeds or {}
        msgs = [Message(RecordDict({C.RECORD_STATE: record,
                                    C.RECORD_CONFIG: ConfigRecord({**config, C.KEY_SITE: n, C.KEY_SEED: seeds.get(n, 0)})}),
                        self.node_of[n], MessageType.EVALUATE, ttl=self.dep.round_timeout_s + 60,
                        group_id=f"{rnd}-evaluate") for n in sites]
        name_of = {self.node_of[n]: n for n in sites}
        scores = {}
        with self.grid.round_deadline(self.dep.round_timeout_s):
            for reply in self.grid.send_and_receive(msgs, timeout=self.dep.round_timeout_s):
                name = name_of.get(reply.metadata.src_node_id)
                if name is None:
                    continue
                if reply.has_error():
                    log.warning("[round %d] site %s did not score its slice: %s", rnd, name, _reason(reply))
                    continue
                metrics = dict(reply.content.metric_records[C.RECORD_METRICS])
                scores[name] = {KEY_N: int(metrics.pop(KEY_NUM_EXAMPLES)), **metrics}
        self.grid.take_traffic()  # scoring is not part of any round's training traffic
        return {n: scores[n] for n in sites if n in scores}  # site order

    def _config(self, rnd: int, task: SiteTask, job: str, shares: int) -> dict:
        rank = {} if task.rank is None else {C.KEY_RANK: task.rank}
        return {C.KEY_SERVER_ROUND: rnd, C.KEY_SITE: task.name, C.KEY_SEED: task.seed, C.KEY_JOB: job,
                C.KEY_TIMEOUT: self.dep.round_timeout_s, C.KEY_SHARES: shares, **rank}

    def _train_plain(self, rnd: int, tasks: list[SiteTask], state: State, job: str, fold: Fold,
                     link: Link) -> RoundResult:
        from fedpeft.state import ClientReport, ClientUpdate, RoundResult

        ttl = self.dep.round_timeout_s + 60
        records = {rank: _broadcast_record(link, state, rank) for rank in {t.rank for t in tasks}}
        msgs = [Message(RecordDict({C.RECORD_STATE: records[t.rank],
                                    C.RECORD_CONFIG: ConfigRecord(self._config(rnd, t, job, len(tasks)))}),
                        self.node_of[t.name], MessageType.TRAIN, ttl=ttl, group_id=str(rnd))
                for t in tasks]
        name_of = {self.node_of[t.name]: t.name for t in tasks}
        rank_of = {t.name: t.rank for t in tasks}
        reports, dropped = {}, []
        for reply in self.grid.send_and_stream(msgs, timeout=self.dep.round_timeout_s):  # as each site answers
            name = name_of.get(reply.metadata.src_node_id)
            if name is None or name in reports:
                continue
            if reply.has_error():
                dropped.append({"client": name, "reason": _reason(reply)})
                fold.drop(name, dropped[-1]["reason"])
                continue
            m = dict(reply.content.metric_records[C.RECORD_METRICS])
            text = dict(reply.content.config_records[C.RECORD_CONFIG])
            n = int(m.pop(KEY_NUM_EXAMPLES))
            metrics = {**m, **{k: v for k, v in text.items() if k != KEY_CLIENT_ID}}
            try:
                received = _received(link, reply.content.array_records[C.RECORD_STATE], state, rank_of[name])
            except AggregationError as e:  # a payload that does not decode: refused like a NaN update
                dropped.append({"client": name, "reason": f"rejected update: {e}"})
                fold.drop(name, dropped[-1]["reason"])
                continue
            update = ClientUpdate(name, received, n, metrics)
            del reply  # the fold keeps at most the sums (and sites waiting for an earlier-sampled one)
            if fold.add(update) is None:
                reports[name] = ClientReport(name, n, metrics)
        for task in tasks:
            if task.name not in reports and all(d["client"] != task.name for d in dropped + fold.dropped):
                dropped.append({"client": task.name, "reason": f"no reply within {self.dep.round_timeout_s:.0f}s"})
                fold.drop(task.name, dropped[-1]["reason"])
        return RoundResult([reports[t.name] for t in tasks if t.name in reports], dropped=dropped)  # sampled order

    def _train_secure(self, rnd: int, tasks: list[SiteTask], state: State, job: str) -> RoundResult:
        from fedpeft.deploy.secagg import SecAggHalted, secure_mean
        from fedpeft.state import ClientReport, RoundResult

        sa = self.dep.secure_aggregation
        extra = {C.KEY_STATE_KEYS: "\n".join(state), C.KEY_CLIP: sa.clipping_range,
                 C.KEY_MAX_WEIGHT: sa.max_weight}
        fitins = {self.node_of[t.name]: {**self._config(rnd, t, job, len(tasks)), **extra} for t in tasks}
        try:
            mean, results = secure_mean(self.grid, self.context, state, fitins, rnd, sa,
                                        self.dep.round_timeout_s)
        except SecAggHalted as e:  # nothing of this attempt is usable; the pool may retry without the lost site
            log.warning("%s", e)
            why = "SecAgg+ halted: nothing of this attempt is usable"
            return RoundResult([], dropped=[{"client": t.name, "reason": why} for t in tasks], secure=True)
        name_of = {nid: name for name, nid in self.node_of.items()}
        by_name = {name_of[r.node_id]: r for r in results}
        reports = [ClientReport(t.name, by_name[t.name].num_examples,
                                {k: v for k, v in by_name[t.name].metrics.items() if k != KEY_CLIENT_ID})
                   for t in tasks if t.name in by_name]
        dropped = [{"client": t.name, "reason": "dropped out of SecAgg+"} for t in tasks if t.name not in by_name]
        return RoundResult(reports, mean=mean, dropped=dropped, secure=True)


def _broadcast_record(link: Link, state: State, rank: int | None):
    """The record sent to the sites of ``rank``: the fp32 state, or its codec's payload."""
    if link.plain and rank is None:
        return state_to_record(state)
    view = link.broadcast(state, rank)
    return state_to_record(view.start) if view.payload is None else arrays_to_record(view.payload)


def _received(link: Link, record, global_state: State, rank: int | None) -> State:
    """A site's update from its reply's record: fp32 as is, or decoded by the job's codec (and
    zero-padded to the global shapes when the site has a smaller rank)."""
    if link.plain and rank is None:
        return record_to_state(record)
    return link.rebuild({k: a.numpy() for k, a in record.items()}, global_state, rank)


def _reason(reply: Message) -> str:
    """A failed reply's reason without Flower's ``<class '...'>:<'...'>`` wrapping."""
    match = re.fullmatch(r"<class '[\w.]+'>:<'(.*)'>", reply.error.reason, flags=re.DOTALL)
    return match.group(1) if match else reply.error.reason
