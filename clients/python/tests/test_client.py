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
    of seconds to stall, or None for success."""

    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.calls: list[str] = []

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
        return self._answer("Publish", context, lambda: pb.PublishResponse(event_id=7))

    def PublishBatch(self, request, context):
        ids = list(range(1, len(request.events) + 1))
        return self._answer(
            "PublishBatch", context, lambda: pb.PublishBatchResponse(event_ids=ids)
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


def test_publish_is_retried_once_on_unavailable(scripted):
    servicer, target = scripted
    client = Client(target, retry_delay=0.01)

    servicer.answers = [grpc.StatusCode.UNAVAILABLE]
    assert client.publish_to_group("table-1", {"type": "x"}) == 7
    assert servicer.calls == ["Publish", "Publish"]

    servicer.calls, servicer.answers = [], [grpc.StatusCode.UNAVAILABLE] * 2
    with pytest.raises(Unavailable, match="scripted UNAVAILABLE"):
        client.publish_batch([Event.to_group("table-1", {"type": "x"})])
    assert servicer.calls == ["PublishBatch", "PublishBatch"]

    # Still unreachable: no retry until the gateway answers again.
    servicer.calls, servicer.answers = [], [grpc.StatusCode.UNAVAILABLE]
    with pytest.raises(Unavailable):
        client.publish_to_group("table-1", {"type": "x"})
    assert servicer.calls == ["Publish"]
    assert client.publish_to_group("table-1", {"type": "x"}) == 7
    servicer.calls, servicer.answers = [], [grpc.StatusCode.UNAVAILABLE]
    assert client.publish_to_group("table-1", {"type": "x"}) == 7
    assert servicer.calls == ["Publish", "Publish"]

    # Neither another status, nor another call is retried.
    servicer.calls, servicer.answers = [], [grpc.StatusCode.INTERNAL]
    with pytest.raises(Exception, match="INTERNAL"):
        client.publish_to_group("table-1", {"type": "x"})
    servicer.answers = [grpc.StatusCode.UNAVAILABLE]
    with pytest.raises(Unavailable):
        client.disconnect([1])
    assert servicer.calls == ["Publish", "Disconnect"]


def test_the_deadline_covers_the_call(scripted):
    servicer, target = scripted
    servicer.answers = [1.0]
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        Client(target, timeout=0.2).publish_to_group("table-1", {"type": "x"})
    assert time.monotonic() - started < 0.9


def test_the_client_reconnects_when_the_gateway_comes_back(tmp_path):
    node = Gateway(log=tmp_path / "channelgate.log")
    try:
        client = Client(node.target, api_key=API_KEY, timeout=1)
        assert client.publish_to_all_users({"type": "x"}) > 0
        node.stop()
        with pytest.raises(Unavailable):
            client.publish_to_all_users({"type": "x"})
        node.start()
        deadline = time.monotonic() + 3
        while True:
            try:
                assert client.publish_to_all_users({"type": "x"}) > 0
                break
            except Unavailable:
                assert time.monotonic() < deadline, "no reconnect within 3 s"
                time.sleep(0.1)
    finally:
        node.stop()
