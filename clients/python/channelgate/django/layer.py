"""A Django Channels layer that sends Baserow's real-time events to channelgate.

Baserow's tasks call `group_send` with five message types meant for its `CoreConsumer`;
with channelgate there is no consumer: each becomes the gRPC call that has the same
effect. Everything else (other message types, `group_add`, `send`/`receive` between
processes) goes to the inner layer, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from channels.layers import BaseChannelLayer
from django.core.serializers.json import DjangoJSONEncoder
from django.utils.module_loading import import_string

from ..client import Client, Event
from ..errors import ChannelgateError

logger = logging.getLogger("channelgate")

IN_MEMORY: Mapping[str, Any] = {"BACKEND": "channels.layers.InMemoryChannelLayer"}

_Call = Callable[[], Any]


class ChannelgateLayer(BaseChannelLayer):  # type: ignore[misc]
    """`CHANNEL_LAYERS` backend: Baserow's broadcasts to channelgate, the rest inward.

    CONFIG keys: `target` (host:port of the gRPC API), `api_key`, `timeout` (seconds
    for one call, its retry included), `tls` / `root_certificates`, `inner` (a layer
    config like `{"BACKEND": ..., "CONFIG": {...}}`; default: the in-memory layer),
    `log_interval` (seconds between two warnings about an unreachable gateway),
    `max_workers` (threads per process that make the gRPC calls).

    A failed gateway call never reaches the caller: the event is dropped, counted in
    `stats` and logged (at most one warning per `log_interval`), so no request or task
    fails because the gateway is away.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        api_key: str | None = None,
        timeout: float = 2.0,
        tls: bool = False,
        root_certificates: bytes | None = None,
        inner: Mapping[str, Any] | None = None,
        log_interval: float = 10.0,
        max_workers: int = 8,
        **kwargs: Any,
    ) -> None:
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
        #: Per process: `sent` calls that reached the gateway, `dropped` ones that failed
        #: (and `dropped:<STATUS>` by gRPC status).
        self.stats: Counter[str] = Counter()
        self._log_interval = log_interval
        self._last_warning = float("-inf")
        self._unreported = 0
        self._max_workers = max_workers
        self._executor: tuple[int, ThreadPoolExecutor] | None = None
        self._lock = threading.Lock()
        _LAYERS.add(self)

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Baserow's five message types go to channelgate; any other to the inner layer."""
        translate = _TRANSLATIONS.get(message.get("type", ""))
        if translate is None:
            await self.inner.group_send(group, message)
            return
        call = translate(self.client, group, message)
        if call is None:
            return
        # The gRPC call blocks: run it beside the event loop, and wait for it so that
        # events of one caller keep their order.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool(), self._deliver, call, message["type"])

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

    def _pool(self) -> ThreadPoolExecutor:
        """This process's executor: a forked child cannot use its parent's threads."""
        pid = os.getpid()
        current = self._executor
        if current is None or current[0] != pid:
            with self._lock:
                current = self._executor
                if current is None or current[0] != pid:
                    pool = ThreadPoolExecutor(self._max_workers, "channelgate")
                    current = self._executor = (pid, pool)
        return current[1]

    def _deliver(self, call: _Call, kind: str) -> None:
        try:
            call()
        except ChannelgateError as error:
            self._dropped(kind, error)
        else:
            with self._lock:
                self.stats["sent"] += 1

    def _dropped(self, kind: str, error: ChannelgateError) -> None:
        status = error.code.name if error.code is not None else "ERROR"
        now = time.monotonic()
        with self._lock:
            self.stats["dropped"] += 1
            self.stats[f"dropped:{status}"] += 1
            self._unreported += 1
            if now - self._last_warning < self._log_interval:
                return
            self._last_warning, count, self._unreported = now, self._unreported, 0
        logger.warning(
            "%s dropped: %s (%d dropped since the last report; next report in %gs at "
            "the earliest)",
            kind,
            error,
            count,
            self._log_interval,
        )


# Baserow's messages, each to the gRPC call with the same effect; None: nobody to reach.


def _broadcast_to_group(
    client: Client, group: str, message: dict[str, Any]
) -> _Call | None:
    event = Event.to_group(
        group,
        _payload(message["payload"]),
        ignore_web_socket_id=message.get("ignore_web_socket_id"),
        exclude_user_ids=message.get("exclude_user_ids") or (),
        record=message.get("record", True) is not False,
    )
    return lambda: client.publish(event)


def _broadcast_to_users(
    client: Client, group: str, message: dict[str, Any]
) -> _Call | None:
    # Baserow sends these to the `users` group, where every connection listens;
    # channelgate reaches the users wherever they are.
    payload = _payload(message["payload"])
    ignore = message.get("ignore_web_socket_id")
    record = message.get("record", True) is not False
    if message.get("send_to_all_users"):
        event = Event.to_all_users(payload, ignore_web_socket_id=ignore, record=record)
    else:
        user_ids = message.get("user_ids") or ()
        if not user_ids:
            return None
        event = Event.to_users(
            user_ids, payload, ignore_web_socket_id=ignore, record=record
        )
    return lambda: client.publish(event)


def _broadcast_to_users_individual_payloads(
    client: Client, group: str, message: dict[str, Any]
) -> _Call | None:
    # Baserow's keys are user ids as strings (channels_redis needs string keys).
    payloads = {int(u): _payload(p) for u, p in message["payload_map"].items()}
    if not payloads:
        return None
    event = Event.individual(
        payloads,
        ignore_web_socket_id=message.get("ignore_web_socket_id"),
        record=message.get("record", True) is not False,
    )
    return lambda: client.publish(event)


def _force_disconnect_users(
    client: Client, group: str, message: dict[str, Any]
) -> _Call | None:
    user_ids = message.get("user_ids") or ()
    if not user_ids:
        return None
    # Baserow passes [web_socket_id] even when that id is None: None spares nobody.
    ignore = message.get("ignore_web_socket_ids") or ()
    return lambda: client.disconnect(user_ids, ignore_web_socket_ids=ignore)


def _users_removed_from_permission_group(
    client: Client, group: str, message: dict[str, Any]
) -> _Call | None:
    user_ids = message.get("user_ids_to_remove") or ()
    if not user_ids:
        return None
    permission_group = message.get("permission_group_name") or group
    return lambda: client.revoke(user_ids, permission_group=permission_group)


_TRANSLATIONS: dict[str, Callable[[Client, str, dict[str, Any]], _Call | None]] = {
    "broadcast_to_group": _broadcast_to_group,
    "broadcast_to_users": _broadcast_to_users,
    "broadcast_to_users_individual_payloads": _broadcast_to_users_individual_payloads,
    "force_disconnect_users": _force_disconnect_users,
    "users_removed_from_permission_group": _users_removed_from_permission_group,
}

#: The message types this layer sends to channelgate; any other goes to the inner layer.
BASEROW_TYPES = tuple(_TRANSLATIONS)

_LAYERS: weakref.WeakSet[ChannelgateLayer] = weakref.WeakSet()


def _reset_after_fork() -> None:
    # A thread of the parent may have held a layer's lock while it forked.
    for layer in list(_LAYERS):
        layer._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _payload(payload: Any) -> Any:
    """The payload without an `_event_id` of the backend's own event recording: the
    gateway numbers events itself and adds its id as the last key."""
    if isinstance(payload, dict) and "_event_id" in payload:
        return {k: v for k, v in payload.items() if k != "_event_id"}
    return payload
