"""broker.ensure.decide: what `mqfed-broker ensure` would do on a given machine (pure, no broker)."""
from __future__ import annotations

import dataclasses

import pytest

from broker.ensure import COMPOSE_FILE, ENABLE_MANAGEMENT, REPO_ROOT, Facts, Plan, decide, is_local, redact

LOCAL = "amqp://guest:guest@localhost:5672/%2F"
OFFLINE_ENABLE = ("rabbitmq-plugins", "enable", "--offline", "rabbitmq_management")
DETACHED = ("rabbitmq-server", "-detached")


def facts(**kw) -> Facts:
    return Facts(**{"url": LOCAL, "broker_answers": False, "hostname": "node7", **kw})


def test_a_broker_that_answers_is_used_as_it_is():
    assert decide(facts(broker_answers=True, management_answers=True, rabbitmq_plugins=True)) == Plan()


def test_a_local_broker_without_the_management_api_gets_the_plugin_enabled():
    plan = decide(facts(broker_answers=True, rabbitmq_server=True, rabbitmq_plugins=True))
    assert plan == Plan(enable_management=ENABLE_MANAGEMENT) and not plan.starts


def test_without_rabbitmq_plugins_nothing_is_enabled():
    assert decide(facts(broker_answers=True)) == Plan()


def test_a_remote_broker_is_never_reconfigured_or_started():
    remote = "amqp://u:p@rabbit.example.org:5672/%2F"
    assert decide(facts(url=remote, broker_answers=True, rabbitmq_plugins=True)) == Plan()
    plan = decide(facts(url=remote, rabbitmq_server=True, rabbitmq_plugins=True, docker_compose=True,
                        compose_file="/x/compose.yml"))
    assert not plan.starts and "rabbit.example.org" in plan.problem


def test_a_broker_that_refuses_the_login_is_not_started_twice():
    plan = decide(facts(login_refused="(403) ACCESS_REFUSED", rabbitmq_server=True, rabbitmq_plugins=True))
    assert not plan.starts and "ACCESS_REFUSED" in plan.problem


def test_a_stopped_local_rabbitmq_server_is_started_with_the_management_plugin_on():
    plan = decide(facts(rabbitmq_server=True, rabbitmq_plugins=True))
    assert plan.prepare == (OFFLINE_ENABLE,)
    assert plan.start == (DETACHED,)
    assert plan.enable_management == ENABLE_MANAGEMENT  # if 15672 stays silent after the boot


def test_systemd_is_tried_first_then_detached():
    plan = decide(facts(rabbitmq_server=True, systemd_unit=True))
    assert plan.start == (("systemctl", "start", "rabbitmq-server"), DETACHED)
    assert plan.prepare == () and plan.enable_management is None  # no rabbitmq-plugins binary


def test_rabbitmq_server_wins_over_docker():
    plan = decide(facts(rabbitmq_server=True, docker_compose=True, compose_file="/r/docker/compose.yml"))
    assert plan.start == (DETACHED,)


def test_docker_compose_uses_the_absolute_compose_file():
    plan = decide(facts(docker_compose=True, compose_file="/r/docker/compose.yml"))
    assert plan.start == (("docker", "compose", "-f", "/r/docker/compose.yml", "up", "-d", "rabbitmq"),)
    assert plan.enable_management is None and plan.prepare == ()


def test_the_compose_file_is_found_relative_to_the_repository_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert COMPOSE_FILE.is_absolute() and COMPOSE_FILE == (REPO_ROOT / "docker" / "compose.yml").resolve()
    assert (REPO_ROOT / "broker" / "ensure.py").is_file()


@pytest.mark.parametrize("kw, words", [
    ({}, "neither rabbitmq-server nor a Docker engine"),
    ({"docker_compose": True, "compose_file": None}, "compose.yml is missing"),
    ({"url": "amqp://guest:guest@localhost:5673/%2F", "rabbitmq_server": True}, "port 5673"),
    ({"url": "amqps://guest:guest@localhost:5671/%2F", "rabbitmq_server": True}, "TLS"),
])
def test_when_nothing_can_be_started_the_plan_says_why(kw, words):
    plan = decide(facts(**kw))
    assert not plan.starts and words in plan.problem


@pytest.mark.parametrize("url, local", [
    ("amqp://localhost", True), ("amqp://g:g@127.0.0.1:5672/%2F", True), ("amqp://[::1]:5672/", True),
    ("amqp://node7:5672/", True), ("amqp://rabbitmq:5672/", False), ("amqp://10.0.0.5/", False),
])
def test_is_local(url, local):
    assert is_local(url, hostname="node7") is local


def test_redact_hides_only_the_password():
    assert redact("amqp://bob:s3cr%40t@h:5672/v") == "amqp://bob:***@h:5672/v"
    assert redact("amqp://h:5672/v") == "amqp://h:5672/v"


def test_facts_and_plans_are_plain_values():
    f = facts(rabbitmq_server=True)
    assert dataclasses.replace(f) == f and decide(f) == decide(f)
