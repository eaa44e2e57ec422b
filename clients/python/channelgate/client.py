"""A synchronous client for channelgate's gRPC API (`channelgate.v1.Gateway`)."""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import grpc

from .errors import from_rpc_error
from .v1 import gateway_pb2 as pb
from .v1 import gateway_pb2_grpc as pb_grpc

#: An event: a JSON object with a string "type", as a mapping (encoded here) or as JSON
#: text already encoded (sent as it is).
Payload = Union[Mapping[str, Any], str, bytes]

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Reconnect soon after the gateway comes back: gRPC's own backoff grows to two minutes,
# and a channel in backoff fails every call at once.
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
)


@dataclass(frozen=True)
class Event:
    """One event for `Client.publish_batch`; build it with a constructor below.

    `record=False` delivers it live only: never kept for replay (Baserow's
    `record=False`, channelgate's `skip_history`).
    """

    payload: Payload | None = None
    group: str | None = None
    user_ids: Sequence[int] | None = None
    all_users: bool = False
    payloads: Mapping[int, Payload] | None = None
    ignore_web_socket_id: str | None = None
    exclude_user_ids: Sequence[int] = ()
    record: bool = True

    @classmethod
    def to_group(
        cls,
        group: str,
        payload: Payload,
        *,
        ignore_web_socket_id: str | None = None,
        exclude_user_ids: Iterable[int] = (),
        record: bool = True,
    ) -> Event:
        """Every socket subscribed to `group` (`users`: every socket)."""
        return cls(
            payload=payload,
            group=group,
            ignore_web_socket_id=ignore_web_socket_id,
            exclude_user_ids=tuple(exclude_user_ids),
            record=record,
        )

    @classmethod
    def to_users(
        cls,
        user_ids: Iterable[int],
        payload: Payload,
        *,
        ignore_web_socket_id: str | None = None,
        record: bool = True,
    ) -> Event:
        """Every socket of these users; no users, no event."""
        return cls(
            payload=payload,
            user_ids=tuple(user_ids),
            ignore_web_socket_id=ignore_web_socket_id,
            record=record,
        )

    @classmethod
    def to_all_users(
        cls,
        payload: Payload,
        *,
        ignore_web_socket_id: str | None = None,
        record: bool = True,
    ) -> Event:
        """Every socket, anonymous ones too."""
        return cls(
            payload=payload,
            all_users=True,
            ignore_web_socket_id=ignore_web_socket_id,
            record=record,
        )

    @classmethod
    def individual(
        cls,
        payloads: Mapping[int, Payload],
        *,
        ignore_web_socket_id: str | None = None,
        record: bool = True,
    ) -> Event:
        """Each user's sockets get that user's payload; no users, no event."""
        return cls(
            payloads=dict(payloads),
            ignore_web_socket_id=ignore_web_socket_id,
            record=record,
        )

    def describe(self) -> str:
        """Who the event is for, for error messages and logs."""
        if self.group is not None:
            return f"group {self.group!r}"
        if self.all_users:
            return "all users"
        if self.payloads is not None:
            return f"individual payloads for users {_ids(self.payloads)}"
        return f"users {_ids(self.user_ids or ())}"


@dataclass(frozen=True)
class Subscription:
    """A page one socket held (and lost, in a revoke)."""

    web_socket_id: str
    user_id: int
    page: str
    parameters: dict[str, Any]
    group: str


@dataclass(frozen=True)
class PermissionCheck:
    """What CheckPermission did: subscriptions examined, those discarded, nodes asked."""

    checked: int = 0
    revoked: list[Subscription] = field(default_factory=list)
    nodes: int = 0


@dataclass(frozen=True)
class NodeInfo:
    """One gateway node's counters at the moment it answered."""

    node_id: str
    version: str
    connections: int
    users: int
    groups: int
    subscriptions: int
    uptime_seconds: int
    #: Presence spaces with members on the node, and its members (0 with presence off).
    presence_spaces: int = 0
    presence_members: int = 0


@dataclass
class _Connection:
    pid: int
    channel: grpc.Channel
    stub: pb_grpc.GatewayStub


class Client:
    """channelgate's gRPC API, synchronously.

    Safe to share between threads and across `fork`: each process makes its own channel
    on its first call (a Celery worker forked from a parent that published gets a fresh
    one), never touching the parent's. Every call has a deadline (`timeout` seconds,
    retries included); Publish and PublishBatch are retried once on UNAVAILABLE after
    `retry_delay` seconds, unless the previous call already found the gateway
    unreachable. Failures raise `ChannelgateError` subclasses that name the call, its
    target and the gateway's reason.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        timeout: float = 5.0,
        retry_delay: float = 0.05,
        tls: bool = False,
        root_certificates: bytes | None = None,
        json_encoder: type[json.JSONEncoder] | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry_delay = retry_delay
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates)
            if tls or root_certificates
            else None
        )
        self._json_encoder = json_encoder
        self._options = _CHANNEL_OPTIONS + tuple(options)
        self._connection: _Connection | None = None
        # The last call found the gateway unreachable (UNAVAILABLE); cleared by an answer.
        self._unreachable = False
        # Channels inherited from a parent process: kept, never used nor closed here, since
        # closing one would act on the parent's connection.
        self._inherited: list[_Connection] = []
        self._lock = threading.Lock()
        _CLIENTS.add(self)

    # Publishing.

    def publish_to_group(
        self,
        group: str,
        payload: Payload,
        *,
        ignore_web_socket_id: str | None = None,
        exclude_user_ids: Iterable[int] = (),
        record: bool = True,
        timeout: float | None = None,
    ) -> int:
        """Publish to a channel group; returns the event id (0 with history off)."""
        event = Event.to_group(
            group,
            payload,
            ignore_web_socket_id=ignore_web_socket_id,
            exclude_user_ids=exclude_user_ids,
            record=record,
        )
        return self.publish(event, timeout=timeout) or 0

    def publish_to_users(
        self,
        user_ids: Iterable[int],
        payload: Payload,
        *,
        ignore_web_socket_id: str | None = None,
        record: bool = True,
        timeout: float | None = None,
    ) -> int | None:
        """Publish to every socket of these users; None (nothing sent) for no users."""
        event = Event.to_users(
            user_ids, payload, ignore_web_socket_id=ignore_web_socket_id, record=record
        )
        return self.publish(event, timeout=timeout)

    def publish_to_all_users(
        self,
        payload: Payload,
        *,
        ignore_web_socket_id: str | None = None,
        record: bool = True,
        timeout: float | None = None,
    ) -> int:
        """Publish to every socket, anonymous ones too; returns the event id."""
        event = Event.to_all_users(
            payload, ignore_web_socket_id=ignore_web_socket_id, record=record
        )
        return self.publish(event, timeout=timeout) or 0

    def publish_individual(
        self,
        payloads: Mapping[int, Payload],
        *,
        ignore_web_socket_id: str | None = None,
        record: bool = True,
        timeout: float | None = None,
    ) -> int | None:
        """Each user gets their own payload; None (nothing sent) for no users."""
        event = Event.individual(
            payloads, ignore_web_socket_id=ignore_web_socket_id, record=record
        )
        return self.publish(event, timeout=timeout)

    def publish(self, event: Event, *, timeout: float | None = None) -> int | None:
        """Publish one `Event`; None when it has no recipients (nothing is sent)."""
        request = self._request(event)
        if request is None:
            return None
        response = self._call(
            "Publish", request, event.describe(), retry=True, timeout=timeout
        )
        return int(response.event_id)

    def publish_batch(
        self, events: Iterable[Event], *, timeout: float | None = None
    ) -> list[int | None]:
        """Publish events in order in one call (on Redis: all of them or none).

        Returns one id per event, None for an event without recipients (not sent).
        """
        events = list(events)
        requests = [self._request(event) for event in events]
        sent = [request for request in requests if request is not None]
        if not sent:
            return [None] * len(events)
        response = self._call(
            "PublishBatch",
            pb.PublishBatchRequest(events=sent),
            f"batch of {len(sent)} events",
            retry=True,
            timeout=timeout,
        )
        ids = iter(response.event_ids)
        return [None if request is None else int(next(ids)) for request in requests]

    # Permissions and connections.

    def check_permission(
        self,
        *,
        user_ids: Iterable[int] | None = None,
        permission_group: str | None = None,
        group: str | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
    ) -> PermissionCheck:
        """Permissions changed: the gateway asks the authorizer again about live pages.

        Scope: `user_ids` (None: every user; an empty list: nobody, nothing is sent),
        `permission_group` (`permissions-table-5`), `group` (`table-5`). Pages no longer
        allowed are discarded (`page_discard`).
        """
        return self._check(user_ids, permission_group, group, False, dry_run, timeout)

    def revoke(
        self,
        user_ids: Iterable[int],
        *,
        permission_group: str | None = None,
        group: str | None = None,
        dry_run: bool = False,
        timeout: float | None = None,
    ) -> PermissionCheck:
        """Discard these users' pages in scope without asking (Baserow's
        `users_removed_from_permission_group`); no users, nothing is sent."""
        return self._check(user_ids, permission_group, group, True, dry_run, timeout)

    def disconnect(
        self,
        user_ids: Iterable[int],
        *,
        ignore_web_socket_ids: Iterable[str | None] = (),
        timeout: float | None = None,
    ) -> int:
        """Close every socket of these users (after `{"type":"force_disconnect"}`),
        except `ignore_web_socket_ids` (None entries mean none); returns the sockets
        closed. No users, nothing is sent."""
        users = list(user_ids)
        if not users:
            return 0
        request = pb.DisconnectRequest(
            user_ids=users,
            ignore_web_socket_ids=[i for i in ignore_web_socket_ids if i],
        )
        response = self._call(
            "Disconnect", request, f"users {_ids(users)}", retry=False, timeout=timeout
        )
        return int(response.disconnected)

    def info(self, *, timeout: float | None = None) -> list[NodeInfo]:
        """The counters of every node that answered."""
        response = self._call(
            "Info", pb.InfoRequest(), "info", retry=False, timeout=timeout
        )
        return [
            NodeInfo(
                node_id=node.node_id,
                version=node.version,
                connections=node.connections,
                users=node.users,
                groups=node.groups,
                subscriptions=node.subscriptions,
                uptime_seconds=node.uptime_seconds,
                presence_spaces=node.presence_spaces,
                presence_members=node.presence_members,
            )
            for node in response.nodes
        ]

    def close(self) -> None:
        """Close this process's channel; the next call opens a new one."""
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None and connection.pid == os.getpid():
            connection.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # Internals.

    def _check(
        self,
        user_ids: Iterable[int] | None,
        permission_group: str | None,
        group: str | None,
        revoke: bool,
        dry_run: bool,
        timeout: float | None,
    ) -> PermissionCheck:
        users = None if user_ids is None else list(user_ids)
        if users is not None and not users:
            return PermissionCheck()
        request = pb.CheckPermissionRequest(
            user_ids=users or [],
            permission_group=permission_group or "",
            group=group or "",
            revoke=revoke,
            dry_run=dry_run,
        )
        scope = [f"users {_ids(users)}" if users else "all users"]
        if permission_group:
            scope.append(f"permission group {permission_group!r}")
        if group:
            scope.append(f"group {group!r}")
        response = self._call(
            "CheckPermission", request, ", ".join(scope), retry=False, timeout=timeout
        )
        return PermissionCheck(
            checked=response.checked,
            revoked=[
                Subscription(
                    web_socket_id=s.web_socket_id,
                    user_id=s.user_id,
                    page=s.page,
                    parameters=json.loads(s.parameters) if s.parameters else {},
                    group=s.group,
                )
                for s in response.revoked
            ],
            nodes=response.nodes,
        )

    def _request(self, event: Event) -> pb.PublishRequest | None:
        """The PublishRequest of an event, or None when it has no recipients."""
        common: dict[str, Any] = {
            "ignore_web_socket_id": event.ignore_web_socket_id or "",
            "skip_history": not event.record,
        }
        if event.group is not None:
            return pb.PublishRequest(
                group=event.group,
                payload=self._encode(event.payload),
                exclude_user_ids=list(event.exclude_user_ids),
                **common,
            )
        if event.all_users:
            return pb.PublishRequest(
                users=pb.UserTarget(all_users=True),
                payload=self._encode(event.payload),
                **common,
            )
        if event.payloads is not None:
            if not event.payloads:
                return None
            payloads = {int(u): self._encode(p) for u, p in event.payloads.items()}
            return pb.PublishRequest(
                individual=pb.IndividualTarget(payloads=payloads), **common
            )
        if event.user_ids is not None:
            if not event.user_ids:
                return None
            return pb.PublishRequest(
                users=pb.UserTarget(user_ids=list(event.user_ids)),
                payload=self._encode(event.payload),
                **common,
            )
        raise ValueError("an Event needs a group, user_ids, all_users or payloads")

    def _encode(self, payload: Payload | None) -> str:
        if payload is None:
            raise ValueError("the event has no payload")
        if isinstance(payload, bytes):
            return payload.decode("utf-8")
        if isinstance(payload, str):
            return payload
        return json.dumps(
            payload, cls=self._json_encoder, ensure_ascii=False, separators=(",", ":")
        )

    def _call(
        self,
        method: str,
        request: Any,
        what: str,
        *,
        retry: bool,
        timeout: float | None,
    ) -> Any:
        """One call with a deadline over all its attempts; one retry on UNAVAILABLE,
        unless the gateway was already unreachable on the last call: during an outage
        each call then fails at once instead of waiting for a retry that fails too."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        call: Callable[..., Any] = getattr(self._stub(), method)
        retry = retry and not self._unreachable
        while True:
            try:
                response = call(
                    request,
                    timeout=max(deadline - time.monotonic(), 0.001),
                    metadata=self._metadata,
                )
            except grpc.RpcError as error:
                unavailable = error.code() == grpc.StatusCode.UNAVAILABLE
                if not (retry and unavailable) or (
                    time.monotonic() + self.retry_delay >= deadline
                ):
                    self._unreachable = unavailable
                    raise from_rpc_error(method, what, error, self.target) from error
                retry = False
                time.sleep(self.retry_delay)
            else:
                self._unreachable = False
                return response

    def _stub(self) -> pb_grpc.GatewayStub:
        """This process's stub, made on first use in each process."""
        connection = self._connection
        pid = os.getpid()
        if connection is not None and connection.pid == pid:
            return connection.stub
        with self._lock:
            connection = self._connection
            if connection is None or connection.pid != pid:
                if connection is not None:
                    self._inherited.append(connection)
                channel = (
                    grpc.secure_channel(self.target, self._credentials, self._options)
                    if self._credentials is not None
                    else grpc.insecure_channel(self.target, self._options)
                )
                stub = pb_grpc.GatewayStub(channel)  # type: ignore[no-untyped-call]
                connection = _Connection(pid, channel, stub)
                self._connection = connection
            return connection.stub

    def _after_fork(self) -> None:
        # A thread of the parent may have held the lock while it forked.
        self._lock = threading.Lock()


def _ids(ids: Iterable[Any], shown: int = 5) -> str:
    """A short list of ids for messages: `[1, 2, 3, ... (12 in all)]`."""
    ids = list(ids)
    if len(ids) <= shown:
        return str(ids)
    return f"[{', '.join(map(str, ids[:shown]))}, ... ({len(ids)} in all)]"


_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for client in list(_CLIENTS):
        client._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
