"""Baserow's five channel-layer messages, sent through the project's CHANNEL_LAYERS as
Baserow's tasks send them, reach (or spare) real sockets on a real channelgate node."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from collections import Counter
from decimal import Decimal
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from channelgate.django.layer import stats


def group_send(group: str, message: dict[str, Any], alias: str = "default") -> None:
    """What Baserow's tasks do: `async_to_sync(channel_layer.group_send)`."""
    async_to_sync(get_channel_layer(alias).group_send)(group, message)


def published(frame: dict[str, Any]) -> dict[str, Any]:
    """A delivered payload without the gateway's `_event_id`, which must come last."""
    assert list(frame)[-1] == "_event_id", frame
    assert isinstance(frame["_event_id"], int) and frame["_event_id"] > 0, frame
    return {k: v for k, v in frame.items() if k != "_event_id"}


def test_broadcast_to_group_spares_the_ignored_socket_and_excluded_users(
    backend, connect, table
):
    from accounts.models import TableAccess

    one, two, three = backend.users
    TableAccess.objects.create(user=three, table_id=table)
    sockets = {
        "a1": connect(one, "a1"),
        "a2": connect(one, "a2"),
        "b": connect(two),
        "c": connect(three),
    }
    for sock in sockets.values():
        assert sock.subscribe("table", table_id=table)["type"] == "page_add"
    elsewhere = connect(one)
    assert elsewhere.subscribe("view", slug="public")["type"] == "page_add"

    when = datetime.datetime(2024, 5, 1, 12, 30, tzinfo=datetime.timezone.utc)
    group_send(
        f"table-{table}",
        {
            "type": "broadcast_to_group",
            "payload": {"type": "rows_updated", "at": when, "total": Decimal("1.50")},
            "ignore_web_socket_id": "a2",
            "exclude_user_ids": [three.id],
        },
    )

    # Encoded as DjangoJSONEncoder does: ISO dates, decimals as strings.
    expected = {"type": "rows_updated", "at": "2024-05-01T12:30:00Z", "total": "1.50"}
    assert published(sockets["a1"].recv()) == expected
    assert published(sockets["b"].recv()) == expected
    for name in ("a2", "c"):
        sockets[name].nothing()
    elsewhere.nothing(0)


def test_record_false_is_delivered_without_an_event_id(backend, connect, table):
    sock = connect(backend.users[0])
    sock.subscribe("table", table_id=table)
    group_send(
        f"table-{table}",
        {
            "type": "broadcast_to_group",
            "payload": {"type": "cursor_moved", "_event_id": 12},
            "ignore_web_socket_id": None,
            "exclude_user_ids": None,
            "record": False,
        },
    )
    # Neither the backend's own id (dropped) nor one of the gateway's.
    assert sock.recv() == {"type": "cursor_moved"}


def test_broadcast_to_users_reaches_the_listed_users_or_everyone(backend, connect):
    one, two, three = backend.users
    a1, a2, b, c = connect(one), connect(one), connect(two), connect(three)
    anonymous = connect(None)

    group_send(
        "users",
        {
            "type": "broadcast_to_users",
            "user_ids": [one.id, two.id],
            "payload": {"type": "user_updated"},
            "ignore_web_socket_id": a2.web_socket_id,
            "send_to_all_users": False,
            "record": True,
        },
    )
    assert published(a1.recv()) == {"type": "user_updated"}
    assert published(b.recv()) == {"type": "user_updated"}
    for sock in (a2, c, anonymous):
        sock.nothing()

    group_send(
        "users",
        {
            "type": "broadcast_to_users",
            "user_ids": [],
            "payload": {"type": "settings_updated"},
            "ignore_web_socket_id": None,
            "send_to_all_users": True,
        },
    )
    for sock in (a1, a2, b, c, anonymous):
        assert published(sock.recv()) == {"type": "settings_updated"}


def test_broadcast_to_no_users_sends_nothing(backend, connect):
    layer = get_channel_layer()
    queued = layer.stats["queued"]
    sock = connect(backend.users[0])
    group_send(
        "users",
        {
            "type": "broadcast_to_users",
            "user_ids": [],
            "payload": {"type": "user_updated"},
            "ignore_web_socket_id": None,
            "send_to_all_users": False,
        },
    )
    group_send(
        "users",
        {
            "type": "broadcast_to_users_individual_payloads",
            "payload_map": {},
            "ignore_web_socket_id": None,
        },
    )
    sock.nothing()
    assert layer.stats["queued"] == queued


def test_individual_payloads_reach_each_user_with_their_own(backend, connect):
    one, two, three = backend.users
    a1, a2, b, c = connect(one), connect(one), connect(two), connect(three)
    group_send(
        "users",
        {
            "type": "broadcast_to_users_individual_payloads",
            "payload_map": {
                str(one.id): {"type": "application_created", "name": "for one"},
                str(two.id): {"type": "application_created", "name": "for two"},
            },
            "ignore_web_socket_id": a2.web_socket_id,
        },
    )
    assert published(a1.recv()) == {"type": "application_created", "name": "for one"}
    assert published(b.recv()) == {"type": "application_created", "name": "for two"}
    a2.nothing()
    c.nothing()


@pytest.mark.parametrize("ignored", [[None], None, "second"])
def test_force_disconnect_users_closes_their_sockets(backend, connect, ignored):
    one, two = backend.users[:2]
    first, second, other = connect(one), connect(one), connect(two)
    group_send(
        "users",
        {
            "type": "force_disconnect_users",
            "user_ids": [one.id],
            "ignore_web_socket_ids": (
                [second.web_socket_id] if ignored == "second" else ignored
            ),
        },
    )
    assert first.recv() == {"type": "force_disconnect"}
    assert first.closed() == 1000
    if ignored == "second":
        second.nothing()
    else:
        # [None] is Baserow's "ignore nobody": the sender had no socket.
        assert second.recv() == {"type": "force_disconnect"}
        assert second.closed() == 1000
    other.nothing(0)
    other.send({"type": "ping"})
    assert other.recv() == {"type": "pong"}


def test_users_removed_from_permission_group_discards_exactly_their_pages(
    backend, connect, table
):
    from accounts.models import TableAccess

    one, two = backend.users[:2]
    other_table = table + 100_000
    TableAccess.objects.create(user=one, table_id=other_table)
    a, a_elsewhere, b = connect(one), connect(one), connect(two)
    for sock in (a, b):
        assert sock.subscribe("table", table_id=table)["type"] == "page_add"
    assert a_elsewhere.subscribe("table", table_id=other_table)["type"] == "page_add"

    permission_group = f"permissions-table-{table}"
    group_send(
        permission_group,
        {
            "type": "users_removed_from_permission_group",
            "user_ids_to_remove": [],
            "permission_group_name": permission_group,
        },
    )
    a.nothing()

    group_send(
        permission_group,
        {
            "type": "users_removed_from_permission_group",
            "user_ids_to_remove": [one.id],
            "permission_group_name": permission_group,
        },
    )
    assert a.recv() == {
        "type": "page_discard",
        "page": "table",
        "parameters": {"table_id": table},
    }
    a_elsewhere.nothing(0)
    b.nothing()

    # Only user two still hears the table.
    group_send(
        f"table-{table}",
        {"type": "broadcast_to_group", "payload": {"type": "rows_deleted"}},
    )
    assert published(b.recv()) == {"type": "rows_deleted"}
    a.nothing()


def test_other_messages_travel_through_the_inner_layer():
    layer = get_channel_layer()
    queued = layer.stats["queued"]

    async def exchange() -> tuple[dict[str, Any], dict[str, Any]]:
        channel = await layer.new_channel()
        await layer.group_add("chat", channel)
        await layer.group_send("chat", {"type": "chat.message", "text": "hi"})
        through_group = await asyncio.wait_for(layer.receive(channel), 2)
        await layer.send(channel, {"type": "export.done", "id": 7})
        direct = await asyncio.wait_for(layer.receive(channel), 2)
        await layer.group_discard("chat", channel)
        return through_group, direct

    through_group, direct = async_to_sync(exchange)()
    assert through_group == {"type": "chat.message", "text": "hi"}
    assert direct == {"type": "export.done", "id": 7}
    assert layer.stats["queued"] == queued


def test_point_to_point_messages_cross_processes_through_channels_redis(gateway, redis_url):
    from channelgate.django import ChannelgateLayer

    layer = ChannelgateLayer(
        target=gateway.target,
        inner={
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [redis_url]},
        },
    )
    # This process's own channel, which the forked worker answers on.
    channel = async_to_sync(layer.new_channel)()

    child = os.fork()
    if child == 0:
        status = 1
        try:
            async_to_sync(layer.send)(channel, {"type": "job.finished", "pid": os.getpid()})
            status = 0
        finally:
            os._exit(status)

    async def receive() -> dict[str, Any]:
        try:
            return await asyncio.wait_for(layer.receive(channel), 5)
        finally:
            await layer.close_pools()

    message = async_to_sync(receive)()
    _, status = os.waitpid(child, 0)
    assert status == 0
    assert message == {"type": "job.finished", "pid": child}


def test_a_stopped_gateway_never_blocks_group_send_nor_drops_silently(backend, caplog):
    layer = get_channel_layer("down")  # gives up on a call after a second
    caplog.set_level(logging.WARNING, logger="channelgate")
    before = Counter(layer.stats)
    slowest = 0.0
    for _ in range(5):
        for message in (
            {"type": "broadcast_to_group", "payload": {"type": "rows_updated"}},
            {
                "type": "force_disconnect_users",
                "user_ids": [1],
                "ignore_web_socket_ids": None,
            },
        ):
            started = time.monotonic()
            group_send("table-1" if "payload" in message else "users", message, "down")
            slowest = max(slowest, time.monotonic() - started)
    assert slowest < 0.05, f"a group_send to a stopped gateway took {slowest:.3f} s"
    assert layer.stats["queued"] == before["queued"] + 10

    # Retried for a second, then given up: counted, logged, and marked lost for the
    # group and the user (the marks wait for the gateway).
    assert not layer.drain(3)
    assert layer.stats["gave_up:too_old"] == before["gave_up:too_old"] + 10
    assert layer.stats["gave_up"] == before["gave_up"] + 10
    assert layer.stats["retries"] > before["retries"]
    assert layer.pending() == 2  # the marks for the group and for user 1
    assert stats()["pending"] >= 2
    lines = [r.getMessage() for r in caplog.records if r.name == "channelgate"]
    assert any("does not take calls" in line and "UNAVAILABLE" in line for line in lines)
    gave_up = [line for line in lines if line.startswith("gave up on")]
    # Rate-limited: one line for the burst, naming what was lost.
    assert len(gave_up) == 1, lines
    assert "broadcast_to_group (group 'table-1')" in gave_up[0]
    assert "will be told to refresh" in gave_up[0]


def test_a_call_the_gateway_refuses_is_logged_counted_and_dropped(
    backend, connect, table, caplog
):
    layer = get_channel_layer()
    caplog.set_level(logging.ERROR, logger="channelgate")
    sock = connect(backend.users[0])
    sock.subscribe("table", table_id=table)
    invalid = layer.stats["invalid"]
    group = f"table-{table}"
    # Queued together, so the sender may batch them: the batch is refused as a whole,
    # then its events go one by one.
    group_send(group, {"type": "broadcast_to_group", "payload": {"type": "first"}})
    group_send(group, {"type": "broadcast_to_group", "payload": [1, 2]})
    group_send(group, {"type": "broadcast_to_group", "payload": {"type": "second"}})
    assert layer.drain(5)
    assert published(sock.recv()) == {"type": "first"}
    assert published(sock.recv()) == {"type": "second"}
    sock.nothing()
    assert layer.stats["invalid"] == invalid + 1
    assert any(
        "dropped, the gateway refuses it" in r.getMessage()
        and "INVALID_ARGUMENT" in r.getMessage()
        for r in caplog.records
    )


def test_a_forked_worker_publishes_on_its_own_channel(backend, connect, table):
    layer = get_channel_layer()
    sock = connect(backend.users[0])
    sock.subscribe("table", table_id=table)
    group = f"table-{table}"
    group_send(group, {"type": "broadcast_to_group", "payload": {"type": "from_parent"}})
    assert published(sock.recv()) == {"type": "from_parent"}
    parent_channel = layer.client._connection.channel

    child = os.fork()
    if child == 0:
        status = 1
        try:
            group_send(
                group, {"type": "broadcast_to_group", "payload": {"type": "from_child"}}
            )
            drained = layer.drain(5)
            connection = layer.client._connection
            own = connection.pid == os.getpid() and connection.channel is not parent_channel
            # The child counts its own: one queued and sent, nothing of the parent's.
            counted = layer.stats["queued"] == layer.stats["sent"] == 1
            status = 0 if own and drained and counted else 2
        finally:
            os._exit(status)

    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert published(sock.recv()) == {"type": "from_child"}
    # The parent's channel still works after the child used its own.
    group_send(group, {"type": "broadcast_to_group", "payload": {"type": "parent_again"}})
    assert published(sock.recv()) == {"type": "parent_again"}
    assert layer.client._connection.channel is parent_channel
