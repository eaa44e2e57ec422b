"""A synchronous client for channelgate's gRPC API (`channelgate.v1.Gateway`)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import threading
import time
import uuid
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
# and a channel in backoff fails every call at once. Some grpcio versions (1.68, 1.71)
# keep a channel in failure for 50 s and more whatever these say: `Client` replaces a
# channel that keeps failing (see `reconnect_interval`).
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    # A channel of its own connections: by default channels of one process share them
    # (with their reconnect backoff), and a replacement would inherit the failing one.
    ("grpc.use_local_subchannel_pool", 1),
)

#: Statuses after which nothing was done (UNAVAILABLE) or the outcome is unknown
#: (DEADLINE_EXCEEDED): a call is repeated, a publish with the same idempotency key.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

# What grpcio says when the connection, not the gateway, failed; the gateway's own
# UNAVAILABLE names its bus or a node. A wrong guess only costs a new connection.
_TRANSPORT_FAILURES = (
    "failed to connect",
    "connection refused",
    "connection reset",
    "connection attempt timed out",
    "connections to all backends failing",
    "socket closed",
    "broken pipe",
    "handshake",
    "goaway",
    "endpoint closing",
    "transport closed",
    "name resolution",
    "dns resolution",
    "empty address list",
    "keepalive",
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
    #: Sent with every attempt of this event: the gateway publishes one key once within
    #: its idempotency window. None: the client makes one for each `publish` call.
    idempotency_key: str | None = None
    #: Not an event: a mark that events for this target were lost (see `mark_lost`).
    lost: bool = False

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

    @classmethod
    def mark_lost(
        cls,
        *,
        group: str | None = None,
        user_ids: Iterable[int] | None = None,
        all_users: bool = False,
    ) -> Event:
        """A mark that events for a group, for users, or for all users were lost before
        they reached the gateway: the target's live sockets are closed with 1012 (their
        clients reconnect and refresh) and a replay across the mark answers
        `force_refresh`. Exactly one target."""
        if (group is not None) + (user_ids is not None) + all_users != 1:
            raise ValueError("a lost mark needs exactly one of group, user_ids, all_users")
        return cls(
            group=group,
            user_ids=None if user_ids is None else tuple(user_ids),
            all_users=all_users,
            lost=True,
        )

    def with_key(self, idempotency_key: str | None = None) -> Event:
        """This event with an idempotency key (a new random one unless given), to keep
        across publishes of your own: the gateway publishes it once."""
        return dataclasses.replace(self, idempotency_key=idempotency_key or new_key())

    def describe(self) -> str:
        """Who the event is for, for error messages and logs."""
        if self.lost:
            return "lost mark for " + dataclasses.replace(self, lost=False).describe()
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
    created: float = field(default_factory=time.monotonic)
    #: Calls running on it; a replaced channel is closed when the last one ends.
    active: int = 0
    retired: bool = False


class Client:
    """channelgate's gRPC API, synchronously.

    Safe to share between threads and across `fork`: each process makes its own channel
    on its first call (a Celery worker forked from a parent that published gets a fresh
    one), never touching the parent's.

    Every call has a deadline (`timeout` seconds, for the client or per call) that covers
    its retries: UNAVAILABLE (nothing was done) and DEADLINE_EXCEEDED (the outcome is
    unknown) are retried with a jittered backoff from `retry_delay` doubling up to
    `max_retry_delay`, until the deadline. Every publish carries an idempotency key, made
    once per event and sent with each retry, so the gateway publishes it once. A channel
    whose connection fails is replaced by a new one (at most every `reconnect_interval`
    seconds; None: never), since some grpcio versions keep a failed channel failing for
    a minute after the gateway is back. Failures raise `ChannelgateError` subclasses that
    name the call, its target, the gateway's reason and the attempts made.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        timeout: float = 10.0,
        retry_delay: float = 0.05,
        max_retry_delay: float = 0.5,
        reconnect_interval: float | None = 0.5,
        tls: bool = False,
        root_certificates: bytes | None = None,
        json_encoder: type[json.JSONEncoder] | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.reconnect_interval = reconnect_interval
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._credentials = (
            grpc.ssl_channel_credentials(root_certificates)
            if tls or root_certificates
            else None
        )
        self._json_encoder = json_encoder
        self._options = _CHANNEL_OPTIONS + tuple(options)
        self._connection: _Connection | None = None
        #: Channels this process made and replaced after a connection failure.
        self.channels_replaced = 0
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
        """Publish one `Event`; None when it has no recipients (nothing is sent).

        Its idempotency key (`event.idempotency_key`, else a new one) goes with every
        attempt, so a retry after UNAVAILABLE or DEADLINE_EXCEEDED publishes it once.
        """
        request = self._request(event)
        if request is None:
            return None
        response = self._call("Publish", request, event.describe(), timeout=timeout)
        return int(response.event_id)

    def publish_batch(
        self, events: Iterable[Event], *, timeout: float | None = None
    ) -> list[int | None]:
        """Publish events in order in one call (on Redis: all of them or none).

        Returns one id per event, None for an event without recipients (not sent). Each
        event has its own idempotency key, kept across the retries of the call.
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
            "Disconnect", request, f"users {_ids(users)}", timeout=timeout
        )
        return int(response.disconnected)

    def info(self, *, timeout: float | None = None) -> list[NodeInfo]:
        """The counters of every node that answered."""
        response = self._call("Info", pb.InfoRequest(), "info", timeout=timeout)
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
        """Close this process's channel (once its running calls end); the next call
        opens a new one."""
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is None or connection.pid != os.getpid():
                return
            connection.retired = True
            idle = connection.active == 0
        if idle:
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
        response = self._call("CheckPermission", request, ", ".join(scope), timeout=timeout)
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
        """The PublishRequest of an event, with its idempotency key (the event's, else a
        new one), or None when it has no recipients."""
        common: dict[str, Any] = {
            "ignore_web_socket_id": event.ignore_web_socket_id or "",
            "skip_history": not event.record,
            "idempotency_key": event.idempotency_key or new_key(),
            "lost": event.lost,
        }
        if event.group is not None:
            return pb.PublishRequest(
                group=event.group,
                payload=self._encode(event.payload, event.lost),
                exclude_user_ids=list(event.exclude_user_ids),
                **common,
            )
        if event.all_users:
            return pb.PublishRequest(
                users=pb.UserTarget(all_users=True),
                payload=self._encode(event.payload, event.lost),
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
                payload=self._encode(event.payload, event.lost),
                **common,
            )
        raise ValueError("an Event needs a group, user_ids, all_users or payloads")

    def _encode(self, payload: Payload | None, lost: bool = False) -> str:
        if payload is None:
            if lost:
                return ""
            raise ValueError("the event has no payload")
        if isinstance(payload, bytes):
            return payload.decode("utf-8")
        if isinstance(payload, str):
            return payload
        return json.dumps(
            payload, cls=self._json_encoder, ensure_ascii=False, separators=(",", ":")
        )

    def _call(self, method: str, request: Any, what: str, *, timeout: float | None) -> Any:
        """One call with a deadline over all its attempts: UNAVAILABLE and
        DEADLINE_EXCEEDED are retried with a jittered, capped backoff while the deadline
        allows another attempt; a channel whose connection failed is replaced first."""
        started = time.monotonic()
        deadline = started + (self.timeout if timeout is None else timeout)
        delay = self.retry_delay
        attempts = 0
        while True:
            attempts += 1
            connection = self._acquire()
            try:
                call: Callable[..., Any] = getattr(connection.stub, method)
                with _FORK_GATE:
                    return call(
                        request,
                        timeout=max(deadline - time.monotonic(), 0.001),
                        metadata=self._metadata,
                    )
            except grpc.RpcError as error:
                code = error.code()
                replaced = (
                    code in RETRYABLE
                    and _connection_failed(error)
                    and self._replace(connection)
                )
                now = time.monotonic()
                # Half to all of the delay (callers failing together spread out); a new
                # channel is tried at once.
                pause = 0.0 if replaced else delay * random.uniform(0.5, 1.0)
                pause = min(pause, deadline - now - 0.01)
                if code not in RETRYABLE or pause < 0:
                    raise from_rpc_error(
                        method,
                        what,
                        error,
                        self.target,
                        attempts=attempts,
                        elapsed=now - started,
                    ) from error
                time.sleep(pause)
                delay = min(delay * 2, self.max_retry_delay)
            finally:
                self._release(connection)

    def _acquire(self) -> _Connection:
        """This process's connection, made on first use in each process (and after a
        replacement), counted as in use until `_release`."""
        pid = os.getpid()
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
            connection.active += 1
            return connection

    def _release(self, connection: _Connection) -> None:
        with self._lock:
            connection.active -= 1
            close = connection.retired and connection.active == 0
        if close and connection.pid == os.getpid():
            connection.channel.close()

    def _replace(self, connection: _Connection) -> bool:
        """The connection failed: the next call opens a new channel, unless this one is
        younger than `reconnect_interval`. The old one closes once its calls are done.
        True if it was replaced."""
        if self.reconnect_interval is None:
            return False
        with self._lock:
            if (
                self._connection is not connection
                or connection.pid != os.getpid()
                or time.monotonic() - connection.created < self.reconnect_interval
            ):
                return False
            self._connection = None
            connection.retired = True
            self.channels_replaced += 1
            return True

    def _stub(self) -> pb_grpc.GatewayStub:
        """This process's stub (for callers of their own; not counted as in use)."""
        connection = self._acquire()
        self._release(connection)
        return connection.stub

    def _after_fork(self) -> None:
        # A thread of the parent may have held the lock while it forked.
        self._lock = threading.Lock()


def new_key() -> str:
    """A new idempotency key: 32 random hex digits."""
    return uuid.uuid4().hex


def _connection_failed(error: grpc.RpcError) -> bool:
    """Whether the channel rather than the gateway failed the call: the connection could
    not be made or broke, or no answer came before the deadline."""
    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "deadline exceeded" in (error.details() or "").lower()
    details = (error.details() or "").lower()
    return any(marker in details for marker in _TRANSPORT_FAILURES)


def _ids(ids: Iterable[Any], shown: int = 5) -> str:
    """A short list of ids for messages: `[1, 2, 3, ... (12 in all)]`."""
    ids = list(ids)
    if len(ids) <= shown:
        return str(ids)
    return f"[{', '.join(map(str, ids[:shown]))}, ... ({len(ids)} in all)]"


_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


class _ForkGate:
    """Keeps `fork` from happening while a thread of this process is inside a gRPC call:
    grpcio prepares a fork only when no thread is calling into it, and a child forked in
    the middle of a call may abort. Before a fork, new attempts wait and running ones
    get up to `FORK_WAIT` seconds to end."""

    FORK_WAIT = 2.0

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.active = 0
        self.forking = False

    def __enter__(self) -> None:
        with self.cond:
            while self.forking:
                self.cond.wait()
            self.active += 1

    def __exit__(self, *_: object) -> None:
        with self.cond:
            self.active -= 1
            if self.active == 0:
                self.cond.notify_all()

    def before_fork(self) -> None:
        with self.cond:
            self.forking = True
            self.cond.wait_for(lambda: self.active == 0, self.FORK_WAIT)

    def after_fork_in_parent(self) -> None:
        with self.cond:
            self.forking = False
            self.cond.notify_all()


_FORK_GATE = _ForkGate()


def _reset_after_fork() -> None:
    global _FORK_GATE
    # The parent's calls do not exist here; a thread may have held the lock.
    _FORK_GATE = _ForkGate()
    for client in list(_CLIENTS):
        client._after_fork()


def _before_fork() -> None:
    _FORK_GATE.before_fork()


def _after_fork_in_parent() -> None:
    _FORK_GATE.after_fork_in_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_reset_after_fork,
    )
