"""`mqfed-coordinator status --watch`, its pure half (coordinator/status.py): events in, lines out, to the
string; and the Heartbeat fields it reads (common/wire/messages.py), old heartbeats included."""
from __future__ import annotations

import re

import msgpack
import pytest

from broker import definitions, topology
from broker.admin import ManagementError
from common.wire import messages as m
from coordinator import status as st

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
TOPO = topology.Topology("kws")
COORDINATOR = definitions.sender_of(TOPO, definitions.coordinator_user(TOPO))
OPERATOR = definitions.sender_of(TOPO, "guest")
SIG = "-0123456789abcdef"


def worker(node: str):
    return definitions.sender_of(TOPO, definitions.worker_user(TOPO, node))


def beat(node="gpu-1", device="cuda:0", sent=NOW - 3, status="busy", **fields) -> m.Heartbeat:
    return m.Heartbeat("kws", node, device, sent, status, **fields)


QUEUES = [st.QueueStat("tasks", 1, 2, 2, "api"), st.QueueStat("updates", 0, 0, 1, "api"),
          st.QueueStat("dead-letters", 3, 0, 0, "api")]


@pytest.fixture
def state() -> st.WatchState:
    s = st.WatchState("kws")
    assert s.apply(m.Registration("kws", "gpu-1", ["cuda:0", "cuda:1"], "iid:1/2", 5120), worker("gpu-1"), NOW - 100)
    assert s.apply(beat(task_id="t000013-v11" + SIG, samples_per_s=142.25, last_update_task="t000011-v9" + SIG,
                        last_update_base=9, last_update_unix=NOW - 7), worker("gpu-1"), NOW - 2)
    assert s.apply(beat(device="cuda:1", sent=NOW - 50, status="idle"), worker("gpu-1"), NOW - 45)
    assert s.apply(m.ModelVersion("kws", 12, 0, 1, 10, "ab" * 32, "x", NOW), COORDINATOR, NOW)
    assert s.apply(m.Metrics("kws", "evaluator", 10, {"accuracy": 0.8125, "loss": 0.5}, NOW), COORDINATOR, NOW)
    return s


# -- the Heartbeat's new fields ------------------------------------------------------------------------------

def test_a_heartbeat_of_an_older_worker_decodes_with_the_defaults():
    old = msgpack.packb({"t": "heartbeat", "v": m.SCHEMA_VERSION, "experiment": "kws", "node": "gpu-1",
                         "device": "cpu", "sent_unix": NOW, "status": "idle"})
    got = m.decode(old)
    assert got == m.Heartbeat("kws", "gpu-1", "cpu", NOW, "idle")
    assert (got.task_id, got.samples_per_s, got.last_update_task, got.last_update_base, got.last_update_unix) \
        == ("", 0.0, "", -1, 0.0)


def test_the_new_heartbeat_fields_round_trip():
    msg = beat(task_id="t1" + SIG, samples_per_s=12.5, last_update_task="t0", last_update_base=4, last_update_unix=NOW)
    assert m.decode(m.encode(msg)) == msg


@pytest.mark.parametrize("field, value, error", [
    ("samples_per_s", float("nan"), "heartbeat: samples_per_s: must be a finite number >= 0, got nan"),
    ("samples_per_s", float("inf"), "samples_per_s: must be a finite number >= 0"),
    ("samples_per_s", -1.0, "samples_per_s: must be a finite number >= 0"),
    ("samples_per_s", "fast", "heartbeat.samples_per_s: expected a number, got str"),
    ("last_update_unix", -5.0, "last_update_unix: must be a finite number >= 0"),
    ("last_update_base", -2, "last_update_base: must be >= -1"),
    ("last_update_base", True, "heartbeat.last_update_base: expected an integer, got bool"),
    ("last_update_base", 3.0, "heartbeat.last_update_base: expected an integer, got float"),
    ("task_id", "t" * (m.MAX_TASK_ID + 1), "task_id: longer than 256 characters"),
    ("last_update_task", b"t1", "heartbeat.last_update_task: expected str, got bytes"),
    ("task_id", None, "heartbeat.task_id: expected str, got NoneType"),
])
def test_hostile_heartbeat_fields_are_refused_naming_the_field(field, value, error):
    body = msgpack.unpackb(m.encode(beat()), raw=False)
    body[field] = value
    with pytest.raises(m.InvalidField) as exc:
        m.decode(msgpack.packb(body, use_bin_type=True))
    assert error in str(exc.value)


# -- events into the state -----------------------------------------------------------------------------------

def test_events_fill_the_state(state):
    t = state.trainers[("gpu-1", "cuda:0")]
    assert (t.status, t.task_id, t.samples_per_s, t.last_update_base, t.heard) == ("busy", "t000013-v11" + SIG, 142.25, 9, NOW - 2)
    assert t.update_age_at_beat == 4.0  # sent - published, both on the worker's clock
    assert (t.shard, t.shard_size) == ("iid:1/2", 5120)
    assert (state.version, state.accuracy, state.accuracy_version, state.ignored) == (12, 0.8125, 10, 0)


def test_forged_impossible_and_foreign_events_are_ignored(state):
    before = dict(state.trainers)
    assert not state.apply(beat(node="gpu-2"), worker("gpu-1"), NOW)  # a worker speaks for its own node only
    assert not state.apply(m.Metrics("kws", "evaluator", 11, {"accuracy": 1.0, "loss": 0.0}, NOW), worker("gpu-1"), NOW)
    assert not state.apply(m.ModelVersion("kws", 99, 0, 1, 1, "ab" * 32, "x", NOW), worker("gpu-1"), NOW)
    assert not state.apply(m.Metrics("kws", "evaluator", 11, {"accuracy": 1.5, "loss": 0.0}, NOW), COORDINATOR, NOW)
    assert not state.apply(m.Metrics("kws", "evaluator", 11, {"loss": 0.0}, NOW), COORDINATOR, NOW)
    assert not state.apply(beat(node="gpu-2"), None, NOW)  # no user_id: nobody vouches for it
    assert not state.apply(m.Heartbeat("other", "gpu-1", "cuda:0", NOW), worker("gpu-1"), NOW)
    assert state.trainers == before and (state.version, state.accuracy) == (12, 0.8125)
    assert state.ignored == 7
    assert state.apply(beat(node="gpu-2"), OPERATOR, NOW)  # an operator (e.g. guest) may speak for anyone


def test_older_evaluations_and_versions_do_not_replace_newer_ones(state):
    state.apply(m.Metrics("kws", "evaluator", 8, {"accuracy": 0.9, "loss": 0.1}, NOW), COORDINATOR, NOW)
    state.apply(m.ModelVersion("kws", 11, 0, 1, 10, "ab" * 32, "x", NOW), COORDINATOR, NOW)
    assert (state.version, state.accuracy, state.accuracy_version) == (12, 0.8125, 10)


def test_the_trainers_remembered_are_bounded(monkeypatch):
    monkeypatch.setattr(st, "MAX_TRAINERS", 3)
    s = st.WatchState("kws")
    for i in range(5):
        s.apply(beat(device=f"cuda:{i}"), OPERATOR, NOW)
    assert len(s.trainers) == 3 and s.ignored == 2
    assert s.apply(beat(device="cuda:0", status="idle"), OPERATOR, NOW)  # one it knows is still updated


# -- values into strings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, shown", [
    (None, "-"), (float("nan"), "-"), (-3.0, "0s"), (0.4, "0s"), (7.6, "8s"), (99.0, "99s"), (100.0, "1m"),
    (5999.0, "99m"), (6000.0, "1h"), (359_999.0, "99h"), (360_000.0, "4d"), (86400.0 * 400, "400d"),
])
def test_ages(seconds, shown):
    assert st.fmt_age(seconds) == shown


def test_task_ids_lose_their_signature_and_names_are_cut_and_cleaned():
    assert st.short_task("t000013-v11" + SIG) == "t000013-v11"
    assert st.short_task("") == "-"
    assert st.short_task("custom-task") == "custom-task"
    assert st.fit("gpu-node-with-a-long-name/cuda:0", 20) == "gpu-node-with-a-lon~"
    assert st.fit("short", 20) == "short"
    assert st.fit("evil\x1b[2Jname\n", 20) == "evil?[2Jname?"  # no escape code reaches the terminal


def test_trainer_rows_compute_staleness_ages_and_dashes(state):
    busy, idle = st.trainer_rows(state, NOW)
    assert busy == st.TrainerRow("gpu-1/cuda:0", "busy", "t000013-v11", "t000011-v9", "9", "6s", "3", "142.2", "2s")
    assert busy.last_update == "v9 6s"  # 2 s since the heartbeat arrived + 4 s old when it left
    assert idle == st.TrainerRow("gpu-1/cuda:1", "idle", "-", "-", "-", "-", "-", "-", "45s!")  # silent > 30 s
    assert idle.last_update == "-"
    state.version = None  # no version seen yet: staleness unknown
    assert st.trainer_rows(state, NOW)[0].stale == "-"
    state.version = 5  # a version older than the base (announcement not seen yet): never negative
    assert st.trainer_rows(state, NOW)[0].stale == "0"
    assert st.trainer_rows(st.WatchState("kws"), NOW) == []


def test_a_trainer_known_only_from_its_registration_is_all_dashes():
    s = st.WatchState("kws")
    s.apply(m.Registration("kws", "gpu-1", ["cpu"], "all", 10), worker("gpu-1"), NOW)
    assert st.trainer_rows(s, NOW) == [st.TrainerRow("gpu-1/cpu", "-", "-", "-", "-", "-", "-", "-", "-")]


def test_the_screen_to_the_string(state):
    lines = st.render_screen(state, QUEUES, NOW, source="(management API)")
    assert lines == [
        "mqfed status  experiment kws                                        08:00:00 UTC",
        "model version 12   accuracy 0.8125 (version 10)",
        "",
        "queues mqfed.kws.* (management API)",
        "queue            ready  unacked  consumers",
        "tasks                1        2          2",
        "updates              0        0          1",
        "dead-letters         3        0          0",
        "",
        "trainer              status task         last update  stale samples/s   beat",
        "gpu-1/cuda:0         busy   t000013-v11  v9 6s            3     142.2     2s",
        "gpu-1/cuda:1         idle   -            -                -         -   45s!",
        "stale: newest version - base of last update; beat: heartbeat age (! > 30s)",
    ]
    assert all(len(line) <= 80 and "\x1b" not in line for line in lines)


def test_an_empty_view_shows_dashes_and_says_why():
    lines = st.render_screen(st.WatchState("kws"), [st.QueueStat("tasks"), st.QueueStat("updates", 4, None, 0, "amqp")],
                             NOW, source="(AMQP: unacked ?)", note="(no worker heartbeat in 5 s)")
    assert lines[1] == "model version -   accuracy -"
    assert lines[3:7] == ["queues mqfed.kws.* (AMQP: unacked ?)", "queue            ready  unacked  consumers",
                          "tasks                -        -          -",  # not there: missing
                          "updates              4        ?          0"]  # a passive declare: unacked unknown
    assert lines[-3:] == ["(no trainer heard from yet)", st.LEGEND, "(no worker heartbeat in 5 s)"]


def test_long_names_fit_80_columns():
    name = "e" * 63  # the longest experiment name there is
    s = st.WatchState(name)
    node = "n" * 60
    s.apply(m.Heartbeat(name, node, "cuda:" + "9" * 40, NOW, "x" * 200, task_id="t" * 256, samples_per_s=1e12,
                        last_update_task="u" * 256, last_update_base=10**12, last_update_unix=1.0), OPERATOR, NOW)
    s.apply(m.ModelVersion(name, 10**15, 0, 1, 1, "ab" * 32, "x", NOW), OPERATOR, NOW)
    s.apply(m.Metrics(name, "evaluator", 10**15, {"accuracy": 1.0}, NOW), OPERATOR, NOW)
    lines = st.render_screen(s, [st.QueueStat("dead-letters", 10**12, 10**12, 10**9, "api")], NOW,
                             source="(management API)", note="n" * 300, shards=True)
    assert max(len(line) for line in lines) <= 80
    assert lines[0].startswith("mqfed status  experiment eeee") and lines[0].endswith("~ 08:00:00 UTC")
    row = next(line for line in lines if line.startswith("nnn"))
    assert row.startswith("n" * 19 + "~ xxxxx~ " + "t" * 11 + "~ ")
    assert st.render_screen(s, [], NOW, width=40)[0].endswith("08:00:00 UTC") and \
        max(len(line) for line in st.render_screen(s, [], NOW, width=40)) <= 40


def test_a_short_terminal_counts_the_trainers_it_cannot_show():
    s = st.WatchState("kws")
    for i in range(30):
        s.apply(beat(node=f"n{i:02d}", device="cpu"), OPERATOR, NOW)
    lines = st.render_screen(s, QUEUES, NOW, max_lines=20)
    assert len(lines) == 20
    assert lines[-2] == "... 22 more trainers (a taller terminal shows them)" and lines[-1] == st.LEGEND
    assert sum(line.startswith("n") for line in lines) == 8  # 10 head lines, 8 rows, 1 count, 1 legend


def test_the_snapshot_adds_each_nodes_shard(state):
    lines = st.render_screen(state, QUEUES, NOW, shards=True)
    assert lines[-1] == "shard of gpu-1: iid:1/2 (5120 clips)"


def test_the_log_to_the_string(state):
    lines = st.render_log(state, QUEUES, NOW)
    assert lines == [
        "2027-01-15T08:00:00Z experiment=kws version=12 accuracy=0.8125@v10 tasks=1/2/2 updates=0/0/1"
        " dead_letters=3 trainers=2",
        "2027-01-15T08:00:00Z trainer=gpu-1/cuda:0 status=busy task=t000013-v11 last_update=t000011-v9 base=9"
        " update_age=6s stale=3 samples_per_s=142.2 beat=2s",
        "2027-01-15T08:00:00Z trainer=gpu-1/cuda:1 status=idle task=- last_update=- base=- update_age=- stale=-"
        " samples_per_s=- beat=45s!",
    ]


def test_log_lines_are_timestamped_one_field_per_key_and_escape_free():
    s = st.WatchState("kws")
    s.apply(beat(node="gpu-1", device="cuda 0\x1b[31m", status="very busy"), OPERATOR, NOW)
    lines = st.render_log(s, [st.QueueStat("tasks", 1, None, 2, "amqp")], NOW, note="waiting: not declared")
    assert all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) and "\x1b" not in line for line in lines)
    assert "tasks=1/?/2" in lines[0] and "version=- accuracy=-" in lines[0]
    assert "trainer=gpu-1/cuda_0?[31m status=very_busy " in lines[1]
    assert lines[-1] == "2027-01-15T08:00:00Z note: waiting: not declared"


# -- the queue counts: management API, else passive declares ----------------------------------------------

class FakeApi:
    def __init__(self, answers):
        self.answers, self.paths = answers, []

    def request(self, method, path):
        self.paths.append(path)
        answer = self.answers(path)
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakeDeclare:
    def __init__(self, count, consumers):
        self.method = type("M", (), {"message_count": count, "consumer_count": consumers})()


class FakeChannel:
    def __init__(self, conn):
        self.conn, self.is_open = conn, True

    def queue_declare(self, name, passive=False):
        assert passive
        self.conn.declared.append(name)
        if name.endswith("dead-letters"):
            import pika.exceptions

            self.is_open = False
            raise pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND")
        return FakeDeclare(5, 1)

    def close(self):
        self.is_open = False


class FakeConn:
    def __init__(self):
        self.declared = []

    def channel(self):
        return FakeChannel(self)


def test_queue_counts_come_from_the_management_api():
    api = FakeApi(lambda path: ManagementError("GET: HTTP 404 not found") if "dead-letters" in path else
                  {"messages_ready": 1, "messages_unacknowledged": 2, "consumers": 3})
    reader = st.QueueReader(TOPO, api, vhost="/")
    assert reader.read(FakeConn()) == [st.QueueStat("tasks", 1, 2, 3, "api"), st.QueueStat("updates", 1, 2, 3, "api"),
                                       st.QueueStat("dead-letters")]
    assert api.paths[0] == "/api/queues/%2F/mqfed.kws.tasks?columns=messages_ready,messages_unacknowledged,consumers"
    assert reader.source == "(management API)"


def test_without_the_management_api_passive_declares_count_and_the_api_is_retried_later(monkeypatch):
    calls = []
    api = FakeApi(lambda path: calls.append(path) or ManagementError("management API unreachable at ..."))
    reader = st.QueueReader(TOPO, api, vhost="/", retry_api_s=30.0)
    conn = FakeConn()
    clock = [1000.0]
    monkeypatch.setattr(st.time, "monotonic", lambda: clock[0])
    expected = [st.QueueStat("tasks", 5, None, 1, "amqp"), st.QueueStat("updates", 5, None, 1, "amqp"),
                st.QueueStat("dead-letters")]
    assert reader.read(conn) == expected and reader.source == "(AMQP: unacked ?)"
    clock[0] += 10
    assert reader.read(conn) == expected and len(calls) == 1  # not asked again for retry_api_s
    clock[0] += 25
    reader.read(conn)
    assert len(calls) == 2


@pytest.mark.parametrize("url, vhost", [
    ("amqp://guest:guest@localhost:5672/%2F", "/"), ("amqp://localhost", "/"), ("amqp://h/", "/"),
    ("amqps://u:p@h:5671/prod", "prod"), ("amqp://h/a%2Fb", "a/b"),
])
def test_the_vhost_of_a_url(url, vhost):
    assert st.vhost_of(url) == vhost
