"""permessage-deflate (RFC 7692) against a real node, with real `websockets` clients that
offer it in each form: what the handshake answers, what arrives, and what a compression
bomb from a client gets."""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import API_KEY, Gateway, Socket, token
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.sync.client import connect

from channelgate import Client

MAX_MESSAGE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gateway = Gateway(
        "--max-message-bytes",
        str(MAX_MESSAGE_BYTES),
        log=tmp_path_factory.mktemp("compression") / "channelgate.log",
    )
    yield gateway
    gateway.stop()


def metric(node: Gateway, name: str) -> int:
    url = f"http://127.0.0.1:{node.ws_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    found = re.search(rf"^{re.escape(name)} (\d+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return int(found.group(1))


def open_socket(
    node: Gateway, user_id: int, **options: object
) -> tuple[Socket, str | None]:
    url = f"ws://127.0.0.1:{node.ws_port}/ws/core/?jwt_token={token(user_id)}"
    connection = connect(url, open_timeout=5, **options).__enter__()  # type: ignore[arg-type]
    assert connection.response is not None
    answered = connection.response.headers.get("Sec-WebSocket-Extensions")
    socket = Socket(connection, "")
    first = socket.recv()
    assert first["type"] == "authentication" and first["success"], first
    return socket, answered


ROWS = {
    "type": "rows_created",
    "table_id": 7,
    "rows": [
        {
            "id": i,
            "order": f"{i}.00000000000000000000",
            "field_101": f"Row {i}",
            "field_102": True,
        }
        for i in range(40)
    ],
}
OFFERS = {
    # (offer, the node's answer, how it compresses for this client)
    "default (client_max_window_bits)": (
        ClientPerMessageDeflateFactory(client_max_window_bits=True),
        "permessage-deflate; client_no_context_takeover",
        "per_socket",
    ),
    "no context takeover either way": (
        ClientPerMessageDeflateFactory(
            server_no_context_takeover=True, client_no_context_takeover=True
        ),
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        "shared",
    ),
    "server window 10, client window 9": (
        ClientPerMessageDeflateFactory(server_max_window_bits=10, client_max_window_bits=9),
        "permessage-deflate; client_no_context_takeover; server_max_window_bits=10",
        "per_socket",
    ),
}


def row_update(n: int) -> dict[str, object]:
    return {
        "type": "rows_updated",
        "table_id": 7,
        "rows": [{"id": n, "order": f"{n}.00000000000000000000", "field_101": f"Row {n}"}],
        "rows_before_update": [{"id": n, "field_101": f"Row {n - 1}"}],
        "metadata": {},
    }


@pytest.mark.parametrize("form", list(OFFERS))
def test_every_offer_form_gets_frames_that_inflate_to_the_published_payloads(node, form):
    factory, expected, mode = OFFERS[form]
    socket, answered = open_socket(node, 1, compression=None, extensions=[factory])
    assert answered == expected
    assert socket.subscribe("table", table_id=7)["type"] == "page_add"
    compressed = f'channelgate_deflate_compressed_bytes_total{{mode="{mode}"}}'
    plain = f'channelgate_deflate_plain_bytes_total{{mode="{mode}"}}'
    before = metric(node, compressed), metric(node, plain)
    small = {"type": "ping_like", "n": 1}
    updates = [row_update(n) for n in range(1, 11)]
    with Client(node.target, api_key=API_KEY) as client:
        first = client.publish_to_group("table-7", ROWS)
        second = client.publish_to_group("table-7", small)
        ids = [client.publish_to_group("table-7", update) for update in updates]
    assert socket.recv() == {**ROWS, "_event_id": first}
    assert socket.recv() == {**small, "_event_id": second}
    for update, event_id in zip(updates, ids):
        assert socket.recv() == {**update, "_event_id": event_id}
    sent = metric(node, compressed) - before[0]
    took = metric(node, plain) - before[1]
    # Everything went compressed, to a fraction of its size (without context, the small
    # one went plain: under the 64-byte minimum).
    assert took > len(json.dumps(ROWS)), took
    assert 0 < sent < took / 3, (sent, took)
    # The client's own messages may be compressed too.
    socket.send({"type": "ping", "padding": "x" * 2000})
    assert socket.recv() == {"type": "pong"}
    socket.close()


def test_a_socket_s_own_stream_sends_fewer_bytes_than_the_shared_form(node):
    """The same row updates to one socket with context and to one without: with context,
    each update refers back to the ones before."""
    own, _ = open_socket(node, 1)
    shared, _ = open_socket(
        node,
        2,
        compression=None,
        extensions=[ClientPerMessageDeflateFactory(server_no_context_takeover=True)],
    )
    sent = {}
    for name, socket, table in [("per_socket", own, 11), ("shared", shared, 12)]:
        assert socket.subscribe("table", table_id=table)["type"] == "page_add"
        counter = f'channelgate_deflate_compressed_bytes_total{{mode="{name}"}}'
        before = metric(node, counter)
        with Client(node.target, api_key=API_KEY) as client:
            for n in range(1, 21):
                client.publish_to_group(f"table-{table}", row_update(n))
        for n in range(1, 21):
            assert socket.recv()["rows"][0]["id"] == n
        sent[name] = metric(node, counter) - before
    assert sent["per_socket"] < sent["shared"] * 0.7, sent


def test_an_event_for_many_sockets_is_compressed_once_for_all(node):
    sockets = [open_socket(node, 3)[0] for _ in range(20)]
    for socket in sockets:
        assert socket.subscribe("table", table_id=13)["type"] == "page_add"
    shared = 'channelgate_deflate_compressed_bytes_total{mode="shared"}'
    own = 'channelgate_deflate_compressed_bytes_total{mode="per_socket"}'
    before = metric(node, shared), metric(node, own)
    with Client(node.target, api_key=API_KEY) as client:
        event_id = client.publish_to_group("table-13", ROWS)
    for socket in sockets:
        assert socket.recv() == {**ROWS, "_event_id": event_id}
    # More sockets than --compression-context-fanout (16): the shared form, for all.
    assert metric(node, own) == before[1]
    assert metric(node, shared) > before[0]
    for socket in sockets:
        socket.close()


def test_replies_shared_frames_and_the_socket_s_own_stream_share_one_window(node):
    """One socket gets, in turn, replies the node makes for it alone, events for many
    sockets (the shared form) and events for it alone (its own stream): a real client
    that keeps one inflater for them all reads every one of them exactly, and the socket's
    own events refer back to whatever came before them."""
    crowd = [open_socket(node, 4)[0] for _ in range(19)]
    me, answered = open_socket(node, 5)
    assert answered == "permessage-deflate; client_no_context_takeover"
    for socket in [*crowd, me]:
        assert socket.subscribe("table", table_id=30)["type"] == "page_add"
    assert me.subscribe("table", table_id=31)["type"] == "page_add"
    own = 'channelgate_deflate_compressed_bytes_total{mode="per_socket"}'
    with Client(node.target, api_key=API_KEY) as client:
        for n in range(1, 4):
            crowd_id = client.publish_to_group("table-30", row_update(n))
            for socket in [*crowd, me]:
                assert socket.recv() == {**row_update(n), "_event_id": crowd_id}
            # The same update to this socket alone refers back to the shared one.
            before = metric(node, own)
            mine = client.publish_to_group("table-31", row_update(n))
            assert me.recv() == {**row_update(n), "_event_id": mine}
            assert metric(node, own) - before < len(json.dumps(row_update(n))) / 4
            me.send({"type": "ping"})
            assert me.recv() == {"type": "pong"}
    # Both ids after the cursor are ones it got live: the replay sends neither again, and
    # its result (a reply) names the newest.
    me.send({"type": "replay_events", "last_seen_id": crowd_id - 1, "supports_retry": True})
    assert me.recv() == {
        "type": "replay_events_result",
        "force_refresh": False,
        "latest_event_id": mine,
    }
    for socket in [*crowd, me]:
        socket.close()


def test_a_client_that_does_not_offer_it_gets_plain_frames(node):
    socket, answered = open_socket(node, 2, compression=None)
    assert answered is None
    assert socket.subscribe("table", table_id=8)["type"] == "page_add"
    counters = [
        f'channelgate_deflate_plain_bytes_total{{mode="{mode}"}}'
        for mode in ("shared", "per_socket")
    ]
    before = [metric(node, counter) for counter in counters]
    with Client(node.target, api_key=API_KEY) as client:
        event_id = client.publish_to_group("table-8", ROWS)
    assert socket.recv() == {**ROWS, "_event_id": event_id}
    assert [metric(node, counter) for counter in counters] == before
    socket.close()


def handshake(node: Gateway, offer: str) -> tuple[int, str | None]:
    connection = http.client.HTTPConnection("127.0.0.1", node.ws_port, timeout=5)
    connection.request(
        "GET",
        f"/ws/core/?jwt_token={token(1)}",
        headers={
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Extensions": offer,
        },
    )
    response = connection.getresponse()
    answered = response.getheader("Sec-WebSocket-Extensions")
    connection.close()
    return response.status, answered


def test_an_offer_the_node_cannot_accept_gets_no_extension_and_still_connects(node):
    for offer in [
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        "permessage-deflate; unknown_parameter",
        "x-webkit-deflate-frame",
    ]:
        assert handshake(node, offer) == (101, None), offer
    # A later acceptable offer in the list is taken.
    status, answered = handshake(
        node,
        "permessage-deflate; server_max_window_bits=16, permessage-deflate; "
        "server_max_window_bits=12",
    )
    assert status == 101
    assert answered is not None and answered.endswith("server_max_window_bits=12")


def rss_kib(node: Gateway) -> int:
    assert node.process is not None
    status = Path(f"/proc/{node.process.pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert found
    return int(found.group(1))


def test_a_compression_bomb_is_closed_with_1009_and_the_node_does_not_grow(node):
    before = rss_kib(node)
    for _ in range(5):
        socket, _ = open_socket(node, 3)
        # 32 MiB of one letter compresses to about 32 KiB: under the 64 KiB frame limit,
        # far over it inflated.
        bomb = "a" * (32 << 20)
        try:
            socket.connection.send(bomb)
        except ConnectionClosed:
            pass
        code = socket.closed()
        assert code == 1009, code
    time.sleep(0.2)
    grown = rss_kib(node) - before
    # Each bomb was stopped after at most the message limit of inflated bytes.
    assert grown < 4 * 1024, f"RSS grew by {grown} KiB"


def test_a_replay_over_a_compressed_socket_gets_every_event_it_missed(node):
    url_id = "tab-compressed"
    with Client(node.target, api_key=API_KEY) as client:
        first = node.socket(token(1), url_id)
        assert first.subscribe("table", table_id=20)["type"] == "page_add"
        seen = client.publish_to_group("table-20", row_update(1))
        assert first.recv()["_event_id"] == seen
        first.close()
        missed = [client.publish_to_group("table-20", row_update(n)) for n in range(2, 6)]
    again = node.socket(token(1), url_id)
    assert again.subscribe("table", table_id=20)["type"] == "page_add"
    again.send({"type": "replay_events", "last_seen_id": seen, "supports_retry": True})
    got = [again.recv() for _ in missed]
    assert [frame["_event_id"] for frame in got] == missed
    assert [frame["rows"][0]["id"] for frame in got] == [2, 3, 4, 5]
    result = again.recv()
    assert result == {
        "type": "replay_events_result",
        "force_refresh": False,
        "latest_event_id": missed[-1],
    }
    again.close()


def test_presence_works_over_compressed_sockets(tmp_path):
    gateway = Gateway("--presence", "on", log=tmp_path / "presence.log")
    try:
        one, _ = open_socket(gateway, 1)
        two, _ = open_socket(gateway, 2)
        assert one.subscribe("table", table_id=5)["type"] == "page_add"
        members = one.recv()
        assert members["type"] == "presence.members" and members["entries"] == []
        assert two.subscribe("table", table_id=5)["type"] == "page_add"
        members = two.recv()
        assert [entry["user_id"] for entry in members["entries"]] == [1]
        joined = one.recv()
        assert joined["type"] == "presence.join" and joined["user_id"] == 2
    finally:
        gateway.stop()


def test_a_compressed_socket_that_does_not_read_is_closed_as_a_slow_consumer(tmp_path):
    gateway = Gateway("--max-queue-bytes", "262144", log=tmp_path / "slow.log")
    try:
        socket, answered = open_socket(gateway, 1)
        assert answered is not None
        assert socket.subscribe("table", table_id=6)["type"] == "page_add"
        # Random text does not compress: it fills the queue as it is.
        noise = {"type": "noise", "data": os.urandom(45_000).hex()}
        with Client(gateway.target, api_key=API_KEY) as client:
            for _ in range(300):
                client.publish_to_group("table-6", noise)
        assert socket.closed(within=10) == 4008
    finally:
        gateway.stop()
