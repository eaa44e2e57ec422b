"""A WebSocket consumer modelled on Baserow's CoreConsumer, speaking channelgate's protocol.

Client frames:
    {"page": "table", "table_id": N}         -> joins `table-N`, answers page_add
    {"remove_page": "table", "table_id": N}  -> leaves `table-N`, answers page_discard
    {"type": "ping"}                         -> {"type": "pong"}

Events come in through the channel layer as
    {"type": "broadcast_to_group", "payload": {...},
     "ignore_web_socket_id": "...", "exclude_user_ids": [...]}
and the payload is sent to the socket unless it is the ignored one or its user is excluded
(with "text" in place of "payload", that text is sent as it is).
"""

import json
import re
import uuid
from urllib.parse import parse_qs

import jwt
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

ANONYMOUS_USER_ID = 0
# Seconds of clock skew tolerated on `exp`, as channelgate does.
EXPIRY_LEEWAY_SECS = 10
WEB_SOCKET_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The only page: its name, parameter and group, as in channelgate's page registry.
TABLE_PAGE = "table"


def user_id_from_token(token):
    """The user id behind a `jwt_token` query parameter, or None if it is refused."""
    if not token:
        return None
    if token == "anonymous":
        return ANONYMOUS_USER_ID
    if not settings.JWT_SECRET:
        return None
    try:
        claims = jwt.decode(
            token,
            settings.JWT_SECRET,
            algorithms=["HS256"],
            options={"require": ["exp"]},
            leeway=EXPIRY_LEEWAY_SECS,
        )
    except jwt.InvalidTokenError:
        return None
    if claims.get("token_type") != "access":
        return None
    return parse_id(claims.get("user_id"), minimum=1)


def parse_id(value, minimum=0):
    """An id given as a JSON integer or a string of digits, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, int) and value >= minimum:
        return value
    return None


class CoreConsumer(AsyncJsonWebsocketConsumer):
    @classmethod
    async def encode_json(cls, content):
        # Compact, like channelgate's frames: same bytes on the wire for the same payload,
        # and the load generator finds `"ts":<digits>` without a JSON parser.
        return json.dumps(content, separators=(",", ":"))

    async def connect(self):
        self.joined = set()
        query = parse_qs(self.scope["query_string"].decode("latin-1"))
        token = query.get("jwt_token", [None])[0]
        client_id = query.get("web_socket_id", [""])[0]

        await self.accept()
        user_id = user_id_from_token(token)
        if user_id is None:
            await self.send_json(
                {"type": "authentication", "success": False, "web_socket_id": None}
            )
            await self.close(code=1008)
            return

        self.user_id = user_id
        self.web_socket_id = (
            client_id if WEB_SOCKET_ID.fullmatch(client_id) else str(uuid.uuid4())
        )
        # Joined before the authentication frame, so a client that has it gets the events.
        await self.join("users")
        await self.join(f"user-{user_id}")
        await self.send_json(
            {
                "type": "authentication",
                "success": True,
                "web_socket_id": self.web_socket_id,
                "replay_enabled": False,
            }
        )

    async def disconnect(self, code):
        for group in list(getattr(self, "joined", ())):
            await self.channel_layer.group_discard(group, self.channel_name)
        self.joined = set()

    async def join(self, group):
        await self.channel_layer.group_add(group, self.channel_name)
        self.joined.add(group)

    async def leave(self, group):
        await self.channel_layer.group_discard(group, self.channel_name)
        self.joined.discard(group)

    # Incoming frames.

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        # Binary frames and text that is not a JSON object are ignored, as Baserow does.
        if text_data is None:
            return
        try:
            content = json.loads(text_data)
        except ValueError:
            return
        if isinstance(content, dict):
            await self.receive_json(content)

    async def receive_json(self, content, **kwargs):
        if getattr(self, "user_id", None) is None:
            return  # refused socket, closing
        if "page" in content:
            await self.page(content["page"], content, add=True)
        elif "remove_page" in content:
            await self.page(content["remove_page"], content, add=False)
        elif content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def page(self, name, content, add):
        parameters = {k: v for k, v in content.items() if k not in ("page", "remove_page")}
        if name != TABLE_PAGE:
            await self.reject(name, parameters, "unknown_page")
            return
        table_id = parse_id(content.get("table_id"))
        if table_id is None:
            await self.reject(name, parameters, "invalid_parameters")
            return
        group = f"table-{table_id}"
        if add:
            await self.join(group)
        else:
            await self.leave(group)
        await self.send_json(
            {
                "type": "page_add" if add else "page_discard",
                "page": name,
                "parameters": {"table_id": table_id},
            }
        )

    async def reject(self, name, parameters, reason):
        await self.send_json(
            {"type": "page_rejected", "page": name, "parameters": parameters, "reason": reason}
        )

    # Channel layer events.

    async def broadcast_to_group(self, event):
        ignore = event.get("ignore_web_socket_id")
        exclude = event.get("exclude_user_ids") or ()
        if ignore and ignore == self.web_socket_id:
            return
        if self.user_id in exclude:
            return
        # The compression benchmark publishes a frame's text as recorded ("text"), so every
        # system sends the same bytes; otherwise the payload goes out as compact JSON.
        if "text" in event:
            await self.send(text_data=event["text"])
            return
        await self.send_json(event["payload"])
