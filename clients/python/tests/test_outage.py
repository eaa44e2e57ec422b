"""The layer while the gateway it calls is away: two real channelgate nodes on a real
redis-server, the layer calling node A, browsers on node B (which stays up) and on A.

Node A is killed (-9) and started again on the same ports; what `group_send` took
meanwhile must reach the sockets once and in order, or, once given up, make them reload.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from conftest import AUTHORIZER_SECRET
from helpers import API_KEY, Gateway, token

from channelgate.django import ChannelgateLayer


@pytest.fixture
def nodes(backend, redis_url, tmp_path) -> Iterator[tuple[Gateway, Gateway]]:
    """Node A (the layer's) and node B, on one Redis, asking the test project."""
    args = (
        "--redis-url",
        redis_url,
        "--authorizer",
        backend.authorizer_url,
        "--authorizer-secret",
        AUTHORIZER_SECRET,
    )
    a = Gateway(*args, log=tmp_path / "a.log")
    b = Gateway(*args, log=tmp_path / "b.log")
    yield a, b
    a.stop()
    b.stop()


def layer_for(node: Gateway, **config: Any) -> ChannelgateLayer:
    return ChannelgateLayer(
        target=node.target, api_key=API_KEY, timeout=1.0, exit_timeout=0.5, **config
    )


def send(layer: ChannelgateLayer, group: str, kind: str) -> float:
    """`group_send` of one event; returns the seconds it took."""
    started = time.monotonic()
    async_to_sync(layer.group_send)(
        group, {"type": "broadcast_to_group", "payload": {"type": kind}}
    )
    return time.monotonic() - started


def kill(node: Gateway) -> None:
    assert node.process is not None
    node.process.kill()
    node.process.wait()


def replay(node: Gateway, user_id: int, web_socket_id: str, table: int, last_seen: int):
    """A browser coming back: same web_socket_id, its page again, then `replay_events`.
    Returns the socket, the events replayed or delivered, and the replay's answer."""
    sock = node.socket(token(user_id), web_socket_id)
    assert sock.subscribe("table", table_id=table)["type"] == "page_add"
    sock.send({"type": "replay_events", "last_seen_id": last_seen, "supports_retry": True})
    events: list[dict[str, Any]] = []
    while True:
        frame = sock.recv()
        if frame["type"] == "replay_events_result":
            return sock, events, frame
        events.append(frame)


def test_group_send_during_a_gateway_restart_reaches_sockets_once_in_order(
    backend, nodes, table
):
    a, b = nodes
    user = backend.users[0]
    layer = layer_for(a)
    group = f"table-{table}"
    on_b, on_a = b.socket(token(user.id)), a.socket(token(user.id))
    for sock in (on_b, on_a):
        assert sock.subscribe("table", table_id=table)["type"] == "page_add"
    send(layer, group, "before")
    first = on_b.recv()["_event_id"]
    assert on_a.recv()["_event_id"] == first
    assert layer.drain(5)

    kill(a)
    assert on_a.closed() in (None, 1006, 1012)
    took = [send(layer, group, f"during-{n}") for n in range(5)]
    assert max(took) < 0.05, f"group_send took {max(took):.3f} s with the gateway away"
    time.sleep(1.5)  # the sender keeps retrying against the dead node
    assert layer.pending() == 5
    a.start()

    # Live on the node that stayed: each once, in order, and no reload.
    frames = [on_b.recv(10) for _ in range(5)]
    assert [f["type"] for f in frames] == [f"during-{n}" for n in range(5)]
    ids = [f["_event_id"] for f in frames]
    assert first < ids[0] and ids == sorted(set(ids))
    on_b.nothing(0.5)
    assert layer.drain(5)
    assert layer.stats["sent"] == 6 and layer.stats["gave_up"] == 0
    assert layer.stats["retries"] > 0

    # The browser of the restarted node comes back and replays: the same five, once.
    again, replayed, result = replay(a, user.id, on_a.web_socket_id, table, first)
    assert [f["type"] for f in replayed] == [f"during-{n}" for n in range(5)]
    assert [f["_event_id"] for f in replayed] == ids
    assert result["force_refresh"] is False and result["latest_event_id"] == ids[-1]
    again.nothing(0.3)
    for sock in (on_b, again):
        sock.close()


@pytest.mark.parametrize("bound", ["give_up_after", "max_queue"])
def test_an_outage_past_the_layers_bounds_makes_the_sockets_reload(
    backend, nodes, table, bound, caplog
):
    a, b = nodes
    user = backend.users[0]
    if bound == "give_up_after":
        layer = layer_for(a, give_up_after=0.5)
    else:
        layer = layer_for(a, max_queue=2)
    group = f"table-{table}"
    sock = b.socket(token(user.id))
    assert sock.subscribe("table", table_id=table)["type"] == "page_add"
    send(layer, group, "before")
    first = sock.recv()["_event_id"]
    assert layer.drain(5)

    kill(a)
    for n in range(3):
        send(layer, group, f"lost-{n}")
    deadline = time.monotonic() + 5
    while layer.stats["gave_up"] == 0:
        assert time.monotonic() < deadline, "nothing given up"
        time.sleep(0.05)
    if bound == "give_up_after":
        time.sleep(0.5)
        assert layer.stats["gave_up:too_old"] == 3
    else:
        assert layer.stats["gave_up:queue_full"] == 1
    assert any(r.getMessage().startswith("gave up on") for r in caplog.records)
    sock.nothing(0.3)

    a.start()
    # The lost mark: the node that stayed closes the group's sockets with 1012...
    assert sock.closed(10) == 1012
    assert layer.drain(5)
    assert layer.stats["marks_sent"] == 1
    # ...and a replay from before the loss cannot be complete.
    again, replayed, result = replay(b, user.id, sock.web_socket_id, table, first)
    assert result["force_refresh"] is True, (replayed, result)
    again.close()


def test_disconnects_keep_their_place_in_the_queue_through_an_outage(backend, nodes, table):
    a, b = nodes
    one, two = backend.users[:2]
    layer = layer_for(a)
    group = f"table-{table}"
    mine, other = b.socket(token(one.id)), b.socket(token(two.id))
    for sock in (mine, other):
        assert sock.subscribe("table", table_id=table)["type"] == "page_add"

    kill(a)
    send(layer, group, "rows_updated")
    async_to_sync(layer.group_send)(
        "users",
        {
            "type": "force_disconnect_users",
            "user_ids": [one.id],
            "ignore_web_socket_ids": [None],
        },
    )
    send(layer, group, "after_disconnect")
    time.sleep(1.0)
    a.start()

    assert mine.recv(10)["type"] == "rows_updated"
    assert mine.recv() == {"type": "force_disconnect"}
    assert mine.closed() == 1000
    assert [other.recv(10)["type"] for _ in range(2)] == [
        "rows_updated",
        "after_disconnect",
    ]
    assert layer.drain(5) and layer.stats["sent"] == 3
    other.close()
