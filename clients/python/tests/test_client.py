"""The Client against a real channelgate node; its retry and deadline against a
scripted gRPC server that answers as told."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any, Callable

import grpc
import pytest
from helpers import API_KEY, Gateway, free_port

from channelgate import (
    Client,
    DeadlineExceeded,
    Event,
    InvalidArgument,
    Unauthenticated,
    Unavailable,
)
from channelgate.v1 import gateway_pb2 as pb
from channelgate.v1 import gateway_pb2_grpc as pb_grpc


@pytest.fixture
def client(gateway) -> Iterator[Client]:
    with Client(gateway.target, api_key=API_KEY) as c:
        yield c


def test_publish_calls_reach_their_sockets(backend, connect, client, table):
    one, two, three = backend.users
    a, b, c = connect(one), connect(two), connect(three)
    a.subscribe("table", table_id=table)

    first = client.publish_to_group(f"table-{table}", {"type": "a"})
    second = client.publish_to_users([two.id], '{"type":"b"}')
    third = client.publish_individual({one.id: {"type": "c1"}, three.id: b'{"type":"c3"}'})
    fourth = client.publish_to_all_users({"type": "d"}, record=False)

    assert 0 < first < second < third
    assert fourth == 0
    assert a.recv() == {"type": "a", "_event_id": first}
    assert b.recv() == {"type": "b", "_event_id": second}
    assert a.recv() == {"type": "c1", "_event_id": third}
    assert c.recv() == {"type": "c3", "_event_id": third}
    for sock in (a, b, c):
        assert sock.recv() == {"type": "d"}


def test_publish_batch_keeps_order_and_skips_events_without_recipients(
    backend, connect, client, table
):
    sock = connect(backend.users[0])
    sock.subscribe("table", table_id=table)
    ids = client.publish_batch(
        [
            Event.to_group(f"table-{table}", {"type": "first"}),
            Event.to_users([], {"type": "nobody"}),
            Event.to_users([backend.users[0].id], {"type": "second"}),
        ]
    )
    assert ids[1] is None and 0 < ids[0] < ids[2]
    assert sock.recv() == {"type": "first", "_event_id": ids[0]}
    assert sock.recv() == {"type": "second", "_event_id": ids[2]}


def test_check_permission_revoke_and_disconnect(backend, connect, client, table):
    one, two = backend.users[:2]
    a, b = connect(one), connect(two)
    for sock in (a, b):
        sock.subscribe("table", table_id=table)

    dry = client.revoke(
        [one.id], permission_group=f"permissions-table-{table}", dry_run=True
    )
    assert [(s.user_id, s.web_socket_id) for s in dry.revoked] == [
        (one.id, a.web_socket_id)
    ]
    a.nothing()

    done = client.revoke([one.id], group=f"table-{table}")
    assert done.nodes == 1
    assert [(s.page, s.parameters, s.group) for s in done.revoked] == [
        ("table", {"table_id": table}, f"table-{table}")
    ]
    assert a.recv()["type"] == "page_discard"

    # Still allowed: the authorizer is asked again and keeps the page.
    checked = client.check_permission(group=f"table-{table}")
    assert checked.checked >= 1 and checked.revoked == []
    b.nothing()

    assert client.disconnect([two.id], ignore_web_socket_ids=[None]) == 1
    assert b.recv() == {"type": "force_disconnect"}
    assert b.closed() == 1000


def test_info_counts_this_nodes_sockets(backend, connect, client):
    before = client.info()[0].connections
    connect(backend.users[0])
    connect(None)
    node = client.info()[0]
    assert node.connections == before + 2
    assert node.node_id and node.version and node.uptime_seconds >= 0


def test_empty_targets_send_nothing():
    # A gateway that is not there would fail any call that was made.
    nowhere = Client(f"127.0.0.1:{free_port()}", timeout=1)
    assert nowhere.publish_to_users([], {"type": "x"}) is None
    assert nowhere.publish_individual({}) is None
    assert nowhere.publish_batch([Event.to_users([], {"type": "x"})]) == [None]
    assert nowhere.revoke([], permission_group="permissions-table-1").revoked == []
    assert nowhere.check_permission(user_ids=[]).checked == 0
    assert nowhere.disconnect([]) == 0
    with pytest.raises(Unavailable):
        nowhere.publish_to_users([1], {"type": "x"})


def test_errors_say_what_failed(gateway):
    with pytest.raises(Unauthenticated) as wrong_key:
        Client(gateway.target, api_key="wrong").publish_to_group("table-1", {"type": "x"})
    assert "channelgate Publish (group 'table-1')" in str(wrong_key.value)
    assert gateway.target in str(wrong_key.value)

    with pytest.raises(InvalidArgument) as bad:
        Client(gateway.target, api_key=API_KEY).publish_to_group("table-1", "[1, 2]")
    assert bad.value.details.startswith("payload")
    assert "INVALID_ARGUMENT" in str(bad.value)


def test_threads_share_one_client(backend, connect, client, table):
    sock = connect(backend.users[0])
    sock.subscribe("table", table_id=table)
    ids: list[int] = []

    def publish(thread: int) -> None:
        for n in range(10):
            ids.append(client.publish_to_group(f"table-{table}", {"type": f"{thread}-{n}"}))

    threads = [threading.Thread(target=publish, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    received = [sock.recv()["_event_id"] for _ in range(80)]
    assert sorted(received) == sorted(ids) and len(set(ids)) == 80


class Scripted(pb_grpc.GatewayServicer):
    """Answers each call with the next of `answers`: a status code to fail with, a number
    of seconds to stall, or None for success; keeps the idempotency keys it was sent."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls: list[str] = []
        self.keys: list[Any] = []

    def _answer(
        self, name: str, context: grpc.ServicerContext, reply: Callable[[], Any]
    ) -> Any:
        self.calls.append(name)
        answer = self.answers.pop(0) if self.answers else None
        if isinstance(answer, grpc.StatusCode):
            context.abort(answer, f"scripted {answer.name}")
        if isinstance(answer, float):
            time.sleep(answer)
        return reply()

    def Publish(self, request, context):
        self.keys.append(request.idempotency_key)
        return self._answer("Publish", context, lambda: pb.PublishResponse(event_id=7))

    def PublishBatch(self, request, context):
        self.keys.append(tuple(event.idempotency_key for event in request.events))
        ids = list(range(1, len(request.events) + 1))
        return self._answer(
            "PublishBatch", context, lambda: pb.PublishBatchResponse(event_ids=ids)
        )

    def CheckPermission(self, request, context):
        return self._answer(
            "CheckPermission", context, lambda: pb.CheckPermissionResponse(nodes=1)
        )

    def Disconnect(self, request, context):
        return self._answer(
            "Disconnect", context, lambda: pb.DisconnectResponse(disconnected=1)
        )


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, str]]:
    servicer = Scripted([])
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_publish_keeps_its_key_across_retries(scripted):
    servicer, target = scripted
    client = Client(target, retry_delay=0.01)

    servicer.answers = [UNAVAILABLE, DEADLINE_EXCEEDED, UNAVAILABLE]
    assert client.publish_to_group("table-1", {"type": "x"}) == 7
    assert servicer.calls == ["Publish"] * 4
    key = servicer.keys[0]
    assert len(key) == 32 and servicer.keys == [key] * 4

    # The next event has a key of its own; an event's own key is sent as it is.
    client.publish_to_group("table-1", {"type": "x"})
    client.publish(Event.to_group("table-1", {"type": "x"}).with_key("order-5-created"))
    assert servicer.keys[4] != key and servicer.keys[5] == "order-5-created"

    # A batch: one key per event, the same on every attempt.
    servicer.keys, servicer.answers = [], [DEADLINE_EXCEEDED]
    events = [Event.to_group("table-1", {"type": "x"}), Event.to_users([1], {"type": "y"})]
    assert client.publish_batch(events) == [1, 2]
    first, second = servicer.keys
    assert first == second and len(set(first)) == 2 and all(first)


def test_every_call_is_retried_until_the_gateway_answers(scripted):
    servicer, target = scripted
    client = Client(target, retry_delay=0.01)

    servicer.answers = [UNAVAILABLE, UNAVAILABLE]
    assert client.disconnect([1]) == 1
    servicer.answers = [DEADLINE_EXCEEDED]
    assert client.revoke([1], permission_group="permissions-table-1").nodes == 1
    servicer.answers = [UNAVAILABLE]
    assert client.check_permission(group="table-1").nodes == 1
    assert servicer.calls == ["Disconnect"] * 3 + ["CheckPermission"] * 4

    # Another status is not retried: the request itself is at fault.
    servicer.calls, servicer.answers = [], [grpc.StatusCode.INVALID_ARGUMENT]
    with pytest.raises(InvalidArgument):
        client.publish_to_group("table-1", {"type": "x"})
    servicer.answers = [grpc.StatusCode.INTERNAL]
    with pytest.raises(Exception, match="INTERNAL"):
        client.disconnect([1])
    assert servicer.calls == ["Publish", "Disconnect"]


def test_retries_back_off_and_stop_at_the_calls_deadline(scripted):
    servicer, target = scripted
    servicer.answers = [UNAVAILABLE] * 1000
    client = Client(target, timeout=0.8, retry_delay=0.02, max_retry_delay=0.2)
    started = time.monotonic()
    with pytest.raises(Unavailable) as failed:
        client.publish_to_group("table-1", {"type": "x"})
    elapsed = time.monotonic() - started
    assert 0.6 < elapsed < 1.2, elapsed
    # Backoff: 0.02 doubling to 0.2 s (jittered to half of it at least) fits few attempts.
    assert 3 < failed.value.attempts < 15, failed.value.attempts
    assert len(servicer.calls) == failed.value.attempts
    assert f"gave up after {failed.value.attempts} attempts" in str(failed.value)
    assert "scripted UNAVAILABLE" in str(failed.value)

    # A deadline per call.
    servicer.answers = [UNAVAILABLE] * 1000
    started = time.monotonic()
    with pytest.raises(Unavailable):
        client.disconnect([1], timeout=0.2)
    assert time.monotonic() - started < 0.5


def test_the_deadline_covers_the_call(scripted):
    servicer, target = scripted
    servicer.answers = [1.0]
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        Client(target, timeout=0.2).publish_to_group("table-1", {"type": "x"})
    assert time.monotonic() - started < 0.9


def test_the_same_key_publishes_once(backend, connect, client, table):
    sock = connect(backend.users[0])
    sock.subscribe("table", table_id=table)
    event = Event.to_group(f"table-{table}", {"type": "once"}).with_key()
    first = client.publish(event)
    again = client.publish(event)
    assert first > 0 and again == first
    assert sock.recv() == {"type": "once", "_event_id": first}
    sock.nothing()


def test_a_failed_channel_is_replaced_so_calls_resume_at_once(tmp_path, capsys):
    """A gateway killed and started again: the next call succeeds within a second of
    the gateway answering, although some grpcio versions keep the old channel failing
    for a minute."""
    node = Gateway(log=tmp_path / "channelgate.log")
    try:
        client = Client(node.target, api_key=API_KEY, timeout=1)
        assert client.publish_to_all_users({"type": "x"}) > 0
        node.process.kill()
        node.process.wait()
        # The outage: each call retries until its deadline, then fails.
        for _ in range(3):
            with pytest.raises(Unavailable):
                client.publish_to_all_users({"type": "x"}, timeout=0.5)
        replaced = client.channels_replaced
        assert replaced >= 1
        node.start()  # returns once the node answers /readyz
        answering = time.monotonic()
        assert client.publish_to_all_users({"type": "x"}, timeout=10) > 0
        resumed = time.monotonic() - answering
        with capsys.disabled():
            print(
                f"\ngrpcio {grpc.__version__}: a call succeeded {resumed * 1000:.0f} ms "
                "after the restarted gateway answered"
            )
        assert resumed < 1.0, f"service resumed {resumed:.2f} s after the restart"
    finally:
        node.stop()
