"""A Django Channels layer that sends Baserow's real-time events to channelgate.

Baserow's tasks call `group_send` with five message types meant for its `CoreConsumer`;
with channelgate there is no consumer: each becomes the gRPC call that has the same
effect. Everything else (other message types, `group_add`, `send`/`receive` between
processes) goes to the inner layer, unchanged.

`group_send` never waits for the gateway: it puts the call on a bounded queue of the
process, which one sender thread empties in order, retrying while the gateway is away
(publishes with their idempotency keys, so a retry never doubles an event). What the
sender finally gives up on (the queue is full, or an event waited longer than
`give_up_after`) is logged, counted, and marked lost: once the gateway answers, a lost
mark for the event's target closes that target's live sockets with 1012 (their clients
reconnect and refresh), and a replay across the mark answers `force_refresh`.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from channels.layers import BaseChannelLayer
from django.core.serializers.json import DjangoJSONEncoder
from django.utils.module_loading import import_string

from ..client import Client, Event
from ..errors import ChannelgateError, InvalidArgument

logger = logging.getLogger("channelgate")

IN_MEMORY: Mapping[str, Any] = {"BACKEND": "channels.layers.InMemoryChannelLayer"}

#: A lost target: ("group", name), ("user", id) or ("all",).
_Target = tuple[Any, ...]
_EVERYONE: _Target = ("all",)


@dataclass
class _Item:
    """One queued call: a publish (`event`, with its key) or another call (`call`)."""

    kind: str
    what: str
    #: Who should be told to refresh when this is given up.
    targets: tuple[_Target, ...]
    event: Event | None = None
    call: Callable[[Client, float], Any] | None = None
    size: int = 0
    queued_at: float = field(default_factory=time.monotonic)
    #: Send alone: it was in a batch the gateway refused as a whole.
    alone: bool = False


class _Marks:
    """Targets whose events were given up, merged, until their marks are published.

    Bounded: past `limit` targets they become one mark for all users.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.groups: set[str] = set()
        self.users: set[int] = set()
        self.everyone = False

    def add(self, targets: Iterable[_Target]) -> None:
        for target in targets:
            if self.everyone:
                return
            if target[0] == "group":
                self.groups.add(target[1])
            elif target[0] == "user":
                self.users.add(target[1])
            else:
                self.everyone = True
        if self.everyone or len(self.groups) + len(self.users) > self.limit:
            self.everyone = True
            self.groups.clear()
            self.users.clear()

    def __bool__(self) -> bool:
        return self.everyone or bool(self.groups) or bool(self.users)

    def __len__(self) -> int:
        return 1 if self.everyone else len(self.groups) + len(self.users)

    def take(self) -> list[Event]:
        """The marks to publish (each with its key), emptying this."""
        if self.everyone:
            events = [Event.mark_lost(all_users=True)]
        else:
            events = [Event.mark_lost(group=group) for group in sorted(self.groups)]
            if self.users:
                events.append(Event.mark_lost(user_ids=sorted(self.users)))
        self.groups, self.users, self.everyone = set(), set(), False
        return [event.with_key() for event in events]


class _Sender:
    """This process's queue and the thread that empties it, in order."""

    def __init__(self, layer: ChannelgateLayer) -> None:
        self.layer = layer
        self.pid = os.getpid()
        self.queue: deque[_Item] = deque()
        self.marks = _Marks(layer.max_marks)
        #: Marks taken from `marks` and being published (kept with their keys).
        self.sending_marks: list[Event] = []
        self.busy = False
        self.cond = threading.Condition(layer._lock)
        self.stop = threading.Event()
        self.outage_since: float | None = None
        self.thread = threading.Thread(
            target=self.run, name="channelgate-sender", daemon=True
        )
        self.thread.start()

    def pending(self) -> bool:
        return bool(self.queue or self.marks or self.sending_marks or self.busy)

    def run(self) -> None:
        failures = 0
        while True:
            with self.cond:
                while not (self.queue or self.marks or self.sending_marks):
                    self.busy = False
                    self.cond.notify_all()
                    if self.stop.is_set():
                        return
                    self.cond.wait()
                self.busy = True
                self._expire(time.monotonic())
                if not self.sending_marks and self.marks:
                    self.sending_marks = self.marks.take()
                marks = list(self.sending_marks)
                batch = [] if marks else self._batch()
            if not marks and not batch:
                continue
            try:
                if marks:
                    self._send_marks(marks)
                else:
                    self._send(batch)
            except ChannelgateError as error:
                failures += 1
                self._failed(error, marks, batch)
                if not isinstance(error, InvalidArgument):
                    # The client already retried within the call's deadline.
                    pause = min(0.05 * 2**failures, 0.5) * random.uniform(0.5, 1.0)
                    if self.stop.wait(pause) and self.layer._stopping_now:
                        return
            except Exception as error:  # noqa: BLE001 - a bug must not stop the sender
                logger.exception("channelgate sender: unexpected error")
                self._refused(error, marks, batch)
            else:
                failures = 0
                self._recovered()

    # Choosing what to send.

    def _batch(self) -> list[_Item]:
        """The head of the queue: one call, or consecutive publishes for one batch."""
        head = self.queue[0]
        if head.event is None or head.alone:
            return [head]
        batch, size = [head], head.size
        for item in list(self.queue)[1 : self.layer.max_batch]:
            if item.event is None or item.alone or size + item.size > _MAX_BATCH_BYTES:
                break
            batch.append(item)
            size += item.size
        return batch

    def _deadline(self) -> float:
        """A call's deadline: the layer's timeout, or less when the head must be given up
        sooner."""
        timeout = self.layer.timeout
        if self.queue:
            left = self.queue[0].queued_at + self.layer.give_up_after - time.monotonic()
            timeout = min(timeout, max(left, 0.05))
        return timeout

    # Sending.

    def _send_marks(self, marks: list[Event]) -> None:
        client = self.layer.client
        if len(marks) == 1:
            client.publish(marks[0], timeout=self.layer.timeout)
        else:
            client.publish_batch(marks, timeout=self.layer.timeout)
        with self.cond:
            self.sending_marks = []
            self.layer.stats["marks_sent"] += len(marks)
        logger.warning(
            "channelgate: published %d lost mark(s) (%s): their sockets reload",
            len(marks),
            ", ".join(mark.describe() for mark in marks[:5]),
        )

    def _send(self, batch: list[_Item]) -> None:
        client = self.layer.client
        head = batch[0]
        if head.call is not None:
            head.call(client, self._deadline())
        elif len(batch) == 1:
            assert head.event is not None
            client.publish(head.event, timeout=self._deadline())
        else:
            events = [item.event for item in batch if item.event is not None]
            client.publish_batch(events, timeout=self._deadline())
        with self.cond:
            for _ in batch:
                self.queue.popleft()
            self.layer.stats["sent"] += len(batch)

    # Failures.

    def _failed(
        self, error: ChannelgateError, marks: list[Event], batch: list[_Item]
    ) -> None:
        if isinstance(error, InvalidArgument):
            # A bug in the caller, not an outage: retrying cannot help.
            self._refused(error, marks, batch)
            return
        now = time.monotonic()
        with self.cond:
            self.layer.stats["retries"] += 1
            queued = len(self.queue)
            first = self.outage_since is None
            if first:
                self.outage_since = now
        if first:
            self.layer._last_report.pop("outage", None)
        self.layer._report(
            logging.WARNING,
            "outage",
            f"channelgate at {self.layer.client.target} does not take calls ({error}); "
            f"{queued} queued in this process, retrying",
            1,
        )

    def _refused(self, error: Exception, marks: list[Event], batch: list[_Item]) -> None:
        """Drops what can never be sent (logged and counted as `invalid`); a batch is
        sent again one by one, to find the event at fault."""
        if marks:
            with self.cond:
                self.sending_marks = []
                self.layer.stats["invalid"] += len(marks)
            self.layer._report(
                logging.ERROR, "invalid", f"lost marks refused: {error}", len(marks)
            )
        elif len(batch) > 1:
            for item in batch:
                item.alone = True
        else:
            with self.cond:
                self.queue.popleft()
                self.layer.stats["invalid"] += 1
            self.layer._report(
                logging.ERROR,
                "invalid",
                f"{batch[0].kind} ({batch[0].what}) dropped, the gateway refuses it: "
                f"{error}",
                1,
            )

    def _recovered(self) -> None:
        with self.cond:
            since, self.outage_since = self.outage_since, None
            queued = len(self.queue)
        if since is not None:
            logger.warning(
                "channelgate at %s takes calls again after %.1f s; %d queued to send",
                self.layer.client.target,
                time.monotonic() - since,
                queued,
            )
            self.layer._flush_reports()

    def _expire(self, now: float) -> None:
        """Gives up on the head while it is older than `give_up_after` (lock held)."""
        limit = self.layer.give_up_after
        while self.queue and now - self.queue[0].queued_at >= limit:
            self.layer._give_up(self.queue.popleft(), "too_old")


class ChannelgateLayer(BaseChannelLayer):  # type: ignore[misc]
    """`CHANNEL_LAYERS` backend: Baserow's broadcasts to channelgate, the rest inward.

    CONFIG keys: `target` (host:port of the gRPC API), `api_key`, `timeout` (deadline of
    one gRPC call, its retries included), `tls` / `root_certificates`, `inner` (a layer
    config like `{"BACKEND": ..., "CONFIG": {...}}`; default: the in-memory layer),
    `max_queue` (calls waiting per process, 10,000), `give_up_after` (seconds a call may
    wait, 300), `max_batch` (events per PublishBatch, 100), `exit_timeout` (seconds to
    send what is queued at process exit, 5), `max_marks` (lost targets remembered before
    they merge into one mark for all users, 10,000), `log_interval` (seconds between two
    log lines about the same trouble, 10).

    `group_send` puts the call on this process's queue and returns; one thread sends the
    queue in order. See the module's documentation and the package README.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        api_key: str | None = None,
        timeout: float = 5.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        inner: Mapping[str, Any] | None = None,
        log_interval: float = 10.0,
        max_queue: int = 10_000,
        give_up_after: float = 300.0,
        max_batch: int = 100,
        exit_timeout: float = 5.0,
        max_marks: int = 10_000,
        max_workers: int | None = None,
        **kwargs: Any,
    ) -> None:
        # max_workers: accepted for older configs; one sender thread does the sending.
        super().__init__(**kwargs)
        inner = inner or IN_MEMORY
        config: Mapping[str, Any] = inner.get("CONFIG") or {}
        self.inner = import_string(inner["BACKEND"])(**config)
        self.extensions = list(getattr(self.inner, "extensions", []))
        self.client = Client(
            target,
            api_key=api_key,
            timeout=timeout,
            tls=tls,
            root_certificates=root_certificates,
            json_encoder=DjangoJSONEncoder,
        )
        self.timeout = timeout
        self.max_queue = max_queue
        self.give_up_after = give_up_after
        self.max_batch = max(1, min(max_batch, 1000))
        self.exit_timeout = exit_timeout
        self.max_marks = max_marks
        #: Per process: `queued`, `sent` (reached the gateway), `retries` (failed
        #: attempts, retried), `gave_up` (and `gave_up:queue_full`, `gave_up:too_old`,
        #: `gave_up:exit`), `invalid` (refused as malformed, dropped), `marks_sent`.
        self.stats: Counter[str] = Counter()
        self._log_interval = log_interval
        self._last_report: dict[str, float] = {}
        self._unreported: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._sender: _Sender | None = None
        self._stopping_now = False
        _LAYERS.add(self)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Baserow's five message types go to channelgate; any other to the inner layer.

        Never waits for the gateway: the call is queued, and sent in order by this
        process's sender thread.
        """
        translate = _TRANSLATIONS.get(message.get("type", ""))
        if translate is None:
            await self.inner.group_send(group, message)
            return
        item = translate(group, message)
        if item is not None:
            self.enqueue(item)

    def enqueue(self, item: _Item) -> None:
        """Queues a call for the sender (gives it up at once when the queue is full)."""
        sender = self._current_sender()
        with sender.cond:
            self.stats["queued"] += 1
            if len(sender.queue) >= self.max_queue:
                self._give_up(item, "queue_full")
                return
            sender.queue.append(item)
            sender.cond.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Waits until everything queued in this process was sent or given up, and the
        lost marks published; True if so within `timeout` seconds (None: no limit).

        For tests and management commands; a web request need not call it."""
        sender = self._sender
        if sender is None or sender.pid != os.getpid():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with sender.cond:
            while sender.pending():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                sender.cond.wait(left)
        return True

    def pending(self) -> int:
        """Calls waiting in this process's queue, and lost marks not yet published."""
        sender = self._sender
        if sender is None or sender.pid != os.getpid():
            return 0
        with sender.cond:
            return len(sender.queue) + len(sender.marks) + len(sender.sending_marks)

    # The rest is the inner layer's.

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        await self.inner.send(channel, message)

    async def receive(self, channel: str) -> dict[str, Any]:
        return await self.inner.receive(channel)  # type: ignore[no-any-return]

    async def new_channel(self, *args: Any, **kwargs: Any) -> str:
        return await self.inner.new_channel(*args, **kwargs)  # type: ignore[no-any-return]

    async def group_add(self, group: str, channel: str) -> None:
        await self.inner.group_add(group, channel)

    async def group_discard(self, group: str, channel: str) -> None:
        await self.inner.group_discard(group, channel)

    async def flush(self) -> None:
        await self.inner.flush()

    async def close_pools(self) -> None:
        """Baserow's tasks call this after sending; it concerns the inner layer only."""
        close = getattr(self.inner, "close_pools", None)
        if close is not None:
            await close()

    def __getattr__(self, name: str) -> Any:
        # Anything else the inner layer offers (receive_single, close, ...).
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # Internals.

    def _current_sender(self) -> _Sender:
        """This process's sender: a forked child starts its own, with an empty queue
        (what the parent queued is the parent's to send)."""
        sender = self._sender
        pid = os.getpid()
        if sender is None or sender.pid != pid:
            with self._lock:
                sender = self._sender
                if sender is None or sender.pid != pid:
                    sender = self._sender = _Sender(self)
        return sender

    def _give_up(self, item: _Item, why: str) -> None:
        """Counts, logs and marks lost a call the layer will not send (lock held)."""
        sender = self._sender
        assert sender is not None
        self.stats["gave_up"] += 1
        self.stats[f"gave_up:{why}"] += 1
        sender.marks.add(item.targets)
        sender.cond.notify_all()
        reason = {
            "queue_full": f"the queue holds {self.max_queue}",
            "too_old": f"it waited {self.give_up_after:g} s",
            "exit": "the process exits",
        }[why]
        tell = (
            "its target will be told to refresh"
            if why != "exit"
            else "its target cannot be told"
        )
        self._report(
            logging.ERROR,
            f"gave_up:{why}",
            f"gave up on {item.kind} ({item.what}): {reason}; {tell}",
            1,
            locked=True,
        )

    def _report(
        self, level: int, key: str, message: str, count: int, locked: bool = False
    ) -> None:
        """Logs `message`, at most once per `log_interval` for one `key`; the next line
        says how many happened in between."""
        now = time.monotonic()
        lock = _NullLock() if locked else self._lock
        with lock:
            self._unreported[key] += count
            last = self._last_report.get(key, float("-inf"))
            if now - last < self._log_interval:
                return
            self._last_report[key] = now
            times = self._unreported.pop(key)
        more = f" ({times} times since the last report)" if times > 1 else ""
        logger.log(level, "%s%s", message, more)

    def _flush_reports(self) -> None:
        """Says how many troubles went unreported (when the gateway is back, at exit)."""
        with self._lock:
            unreported = +self._unreported
            self._unreported.clear()
            self._last_report.clear()
        for key, times in sorted(unreported.items()):
            if key in _UNREPORTED:
                logger.warning("channelgate: %d more %s", times, _UNREPORTED[key])

    def _at_exit(self) -> None:
        """Sends what is queued for up to `exit_timeout` seconds, then gives up on the
        rest, loudly."""
        sender = self._sender
        if sender is None or sender.pid != os.getpid():
            return
        self.drain(self.exit_timeout)
        with sender.cond:
            self._stopping_now = True
            sender.stop.set()
            while sender.queue:
                self._give_up(sender.queue.popleft(), "exit")
            marks = len(sender.marks) + len(sender.sending_marks)
            sender.cond.notify_all()
        self._flush_reports()
        if marks:
            logger.error(
                "channelgate: %d lost mark(s) were not published before exit: browsers "
                "of their targets keep what they have until they reconnect",
                marks,
            )


_UNREPORTED = {
    "gave_up:queue_full": "calls given up (queue full) since the last report",
    "gave_up:too_old": "calls given up (waited too long) since the last report",
    "gave_up:exit": "calls given up at exit",
    "invalid": "calls refused by the gateway since the last report",
}


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


#: Payload bytes per PublishBatch (the gateway's default limit is 1 MiB).
_MAX_BATCH_BYTES = 256 * 1024

_ENCODER = DjangoJSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _encode(payload: Any) -> str:
    """Encoded now, as DjangoJSONEncoder does: the caller may change it after sending."""
    if isinstance(payload, bytes):
        return payload.decode("utf-8")
    if isinstance(payload, str):
        return payload
    encoded: str = _ENCODER.encode(_payload(payload))
    return encoded


def _record(message: Mapping[str, Any]) -> bool:
    return message.get("record", True) is not False


def _publish(kind: str, event: Event, targets: Iterable[_Target]) -> _Item:
    event = event.with_key()
    size = len(event.payload or "") if isinstance(event.payload, str) else 0
    for payload in (event.payloads or {}).values():
        size += len(payload) if isinstance(payload, (str, bytes)) else 0
    return _Item(kind, event.describe(), tuple(targets), event=event, size=size)


def _group_target(group: str) -> _Target:
    # The group `users` is every connection.
    return _EVERYONE if group == "users" else ("group", group)


# Baserow's messages, each to the call with the same effect; None: nobody to reach.


def _broadcast_to_group(group: str, message: dict[str, Any]) -> _Item | None:
    event = Event.to_group(
        group,
        _encode(message["payload"]),
        ignore_web_socket_id=message.get("ignore_web_socket_id"),
        exclude_user_ids=message.get("exclude_user_ids") or (),
        record=_record(message),
    )
    return _publish("broadcast_to_group", event, [_group_target(group)])


def _broadcast_to_users(group: str, message: dict[str, Any]) -> _Item | None:
    # Baserow sends these to the `users` group, where every connection listens;
    # channelgate reaches the users wherever they are.
    payload = _encode(message["payload"])
    ignore = message.get("ignore_web_socket_id")
    if message.get("send_to_all_users"):
        event = Event.to_all_users(
            payload, ignore_web_socket_id=ignore, record=_record(message)
        )
        return _publish("broadcast_to_users", event, [_EVERYONE])
    user_ids = [int(u) for u in message.get("user_ids") or ()]
    if not user_ids:
        return None
    event = Event.to_users(
        user_ids, payload, ignore_web_socket_id=ignore, record=_record(message)
    )
    return _publish("broadcast_to_users", event, [("user", u) for u in user_ids])


def _broadcast_to_users_individual_payloads(
    group: str, message: dict[str, Any]
) -> _Item | None:
    # Baserow's keys are user ids as strings (channels_redis needs string keys).
    payloads = {int(u): _encode(p) for u, p in message["payload_map"].items()}
    if not payloads:
        return None
    event = Event.individual(
        payloads,
        ignore_web_socket_id=message.get("ignore_web_socket_id"),
        record=_record(message),
    )
    return _publish(
        "broadcast_to_users_individual_payloads",
        event,
        [("user", u) for u in payloads],
    )


def _force_disconnect_users(group: str, message: dict[str, Any]) -> _Item | None:
    user_ids = [int(u) for u in message.get("user_ids") or ()]
    if not user_ids:
        return None
    # Baserow passes [web_socket_id] even when that id is None: None spares nobody.
    ignore = [i for i in message.get("ignore_web_socket_ids") or () if i]

    def call(client: Client, timeout: float) -> Any:
        return client.disconnect(user_ids, ignore_web_socket_ids=ignore, timeout=timeout)

    return _Item(
        "force_disconnect_users",
        f"users {user_ids[:5]}{'...' if len(user_ids) > 5 else ''}",
        tuple(("user", u) for u in user_ids),
        call=call,
    )


def _users_removed_from_permission_group(
    group: str, message: dict[str, Any]
) -> _Item | None:
    user_ids = [int(u) for u in message.get("user_ids_to_remove") or ()]
    if not user_ids:
        return None
    permission_group = message.get("permission_group_name") or group

    def call(client: Client, timeout: float) -> Any:
        return client.revoke(user_ids, permission_group=permission_group, timeout=timeout)

    return _Item(
        "users_removed_from_permission_group",
        f"users {user_ids[:5]}{'...' if len(user_ids) > 5 else ''} "
        f"from {permission_group!r}",
        tuple(("user", u) for u in user_ids),
        call=call,
    )


_TRANSLATIONS: dict[str, Callable[[str, dict[str, Any]], _Item | None]] = {
    "broadcast_to_group": _broadcast_to_group,
    "broadcast_to_users": _broadcast_to_users,
    "broadcast_to_users_individual_payloads": _broadcast_to_users_individual_payloads,
    "force_disconnect_users": _force_disconnect_users,
    "users_removed_from_permission_group": _users_removed_from_permission_group,
}

#: The message types this layer sends to channelgate; any other goes to the inner layer.
BASEROW_TYPES = tuple(_TRANSLATIONS)

_LAYERS: weakref.WeakSet[ChannelgateLayer] = weakref.WeakSet()


def stats() -> dict[str, int]:
    """The counters of every ChannelgateLayer of this process, added up, with `pending`
    (calls queued and lost marks not yet published, now)."""
    total: Counter[str] = Counter()
    for layer in list(_LAYERS):
        with layer._lock:
            total.update(layer.stats)
        total["pending"] += layer.pending()
    return dict(total)


def drain(timeout: float | None = None) -> bool:
    """`ChannelgateLayer.drain` for every layer of this process (a management command,
    a Celery worker's `worker_process_shutdown`); True if all were sent in time."""
    deadline = None if timeout is None else time.monotonic() + timeout
    done = True
    for layer in list(_LAYERS):
        left = None if deadline is None else max(deadline - time.monotonic(), 0)
        done = layer.drain(left) and done
    return done


def _drain_at_exit() -> None:
    for layer in list(_LAYERS):
        try:
            layer._at_exit()
        except Exception:  # noqa: BLE001 - exit anyway
            logger.exception("channelgate: sending at exit failed")


atexit.register(_drain_at_exit)


def _reset_after_fork() -> None:
    # A thread of the parent may have held a layer's lock while it forked; the parent's
    # sender thread does not exist here, and its queue is the parent's to send.
    for layer in list(_LAYERS):
        layer._lock = threading.Lock()
        layer._sender = None
        layer.stats = Counter()
        layer._unreported = Counter()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _payload(payload: Any) -> Any:
    """The payload without an `_event_id` of the backend's own event recording: the
    gateway numbers events itself and adds its id as the last key."""
    if isinstance(payload, dict) and "_event_id" in payload:
        return {k: v for k, v in payload.items() if k != "_event_id"}
    return payload


__all__ = ["BASEROW_TYPES", "ChannelgateLayer", "drain", "stats"]
