"""The HTTP authorizer as a Django view: channelgate asks it before a socket may
subscribe to a page and, with `--authorize-connect`, before a token may connect.

    channelgate --authorizer http://backend:8000/api/channelgate/authorize/ \\
                --authorizer-secret "$CHANNELGATE_AUTHORIZER_SECRET" --authorize-connect

Settings:

- `CHANNELGATE_AUTHORIZER_SECRET`: the `--authorizer-secret`; a request without it in
  `X-Channelgate-Secret` gets 403.
- `CHANNELGATE_SUBSCRIBE_CHECK`: dotted path of `check(user, web_socket_id, page,
  parameters, group) -> bool` (called with keywords; `user` is an `AnonymousUser` for
  anonymous sockets). Required: the view cannot guess who may see what.
  Baserow: `"channelgate.baserow.can_subscribe"`.
- `CHANNELGATE_CONNECT_CHECK`: dotted path of `check(user_id, web_socket_id,
  token_issued_at, token_id) -> bool`; default `may_connect` below.
  Baserow: `"channelgate.baserow.can_connect"`.
- `CHANNELGATE_PRESENCE_SPACE` (optional, for `--presence on`): dotted path of
  `space(user, page, parameters, group) -> str | None`, the presence space an allowed
  page joins when the gateway's page table gives it none (a public view joins its
  table's space, `table-<id>`).

The answer is `{"allowed": true|false}`, with `"presence_space"` when one is named. An
exception in a check is a 500, which the gateway treats as a denial
(`authorizer_unavailable`): it fails closed.
"""

from __future__ import annotations

import hmac
import json
from datetime import datetime
from typing import Any, Callable

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.module_loading import import_string
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST


@csrf_exempt
@require_POST
def authorize(request: HttpRequest) -> HttpResponse:
    """Answers channelgate's subscribe and connect questions."""
    secret = getattr(settings, "CHANNELGATE_AUTHORIZER_SECRET", "")
    if not secret:
        raise ImproperlyConfigured("CHANNELGATE_AUTHORIZER_SECRET is not set")
    given = request.headers.get("X-Channelgate-Secret", "")
    if not hmac.compare_digest(given.encode(), str(secret).encode()):
        return JsonResponse({"error": "wrong X-Channelgate-Secret"}, status=403)
    try:
        question = json.loads(request.body)
        if not isinstance(question, dict):
            raise ValueError("the body is not a JSON object")
        # A gateway without the connect check sends no action: a subscribe.
        action = question.get("action", "subscribe")
        if action == "subscribe":
            decide = _subscribe(question)
        elif action == "connect":
            decide = _connect(question)
        else:
            raise ValueError(f"unknown action {action!r}")
    except ValueError as error:
        return JsonResponse({"error": f"unreadable question: {error}"}, status=400)
    # Outside the try: an error in the project's check is a 500, not a bad question.
    return JsonResponse(decide())


def _subscribe(question: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """Checks the question; returns the decision, still to be made."""
    user_id = _field(question, "user_id", int)
    asked = {
        "web_socket_id": _field(question, "web_socket_id", str),
        "page": _field(question, "page", str),
        "parameters": _field(question, "parameters", dict),
        "group": _field(question, "group", str),
    }

    def decide() -> dict[str, Any]:
        user = anonymous_user() if user_id == 0 else active_user(user_id)
        check = _setting("CHANNELGATE_SUBSCRIBE_CHECK", None)
        if user is None or not check(user=user, **asked):
            return {"allowed": False}
        answer: dict[str, Any] = {"allowed": True}
        space_of = getattr(settings, "CHANNELGATE_PRESENCE_SPACE", None)
        if space_of:
            space_of = import_string(space_of) if isinstance(space_of, str) else space_of
            asked_page = {k: v for k, v in asked.items() if k != "web_socket_id"}
            space = space_of(user=user, **asked_page)
            if space:
                answer["presence_space"] = str(space)
        return answer

    return decide


def _connect(question: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """Checks the question; returns the decision, still to be made."""
    issued_at = question.get("token_issued_at")
    if issued_at is not None and (
        not isinstance(issued_at, int) or isinstance(issued_at, bool)
    ):
        raise ValueError("token_issued_at: must be an integer or null")
    token_id = question.get("token_id")
    if token_id is not None and not isinstance(token_id, str):
        raise ValueError("token_id: must be a string or null")
    asked = {
        "user_id": _field(question, "user_id", int),
        "web_socket_id": _field(question, "web_socket_id", str),
        "token_issued_at": issued_at,
        "token_id": token_id,
    }

    def decide() -> dict[str, Any]:
        check = _setting("CHANNELGATE_CONNECT_CHECK", may_connect)
        return {"allowed": bool(check(**asked))}

    return decide


# The default connect check and its parts, for a project's own check to reuse.


def may_connect(
    user_id: int,
    web_socket_id: str,
    token_issued_at: int | None,
    token_id: str | None,
) -> bool:
    """The user exists and is active, and the token is not older than the user's last
    password change (so changing a password shuts out the sockets of stolen tokens)."""
    user = active_user(user_id)
    return user is not None and not issued_before_password_change(user, token_issued_at)


def active_user(user_id: int) -> Any:
    """The active user with this id, or None."""
    from django.contrib.auth import get_user_model

    user = get_user_model()._default_manager.filter(pk=user_id).first()
    return user if user is not None and getattr(user, "is_active", True) else None


def anonymous_user() -> Any:
    from django.contrib.auth.models import AnonymousUser

    return AnonymousUser()


def password_changed_at(user: Any) -> datetime | None:
    """When the user last changed their password, if the project records it: on the
    profile (`user.profile.last_password_change`, Baserow's) or on the user itself."""
    profile = getattr(user, "profile", None)
    changed = getattr(profile, "last_password_change", None)
    if changed is None:
        changed = getattr(user, "last_password_change", None)
    return changed


def issued_before_password_change(user: Any, issued_at: int | None) -> bool:
    """Whether a token with this `iat` predates the last password change. Compared in
    whole seconds, as `iat` is (Baserow does the same); a token without `iat` counts as
    older once a change is recorded."""
    changed = password_changed_at(user)
    if changed is None:
        return False
    if issued_at is None:
        return True
    return int(changed.timestamp()) > issued_at


def _field(question: dict[str, Any], name: str, kind: type) -> Any:
    if name not in question:
        raise ValueError(f"{name}: missing")
    value = question[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{name}: must be of type {kind.__name__}")
    return value


def _setting(name: str, default: Callable[..., Any] | None) -> Callable[..., Any]:
    value = getattr(settings, name, None) or default
    if value is None:
        raise ImproperlyConfigured(
            f"{name} is not set: name the function that answers channelgate"
        )
    return import_string(value) if isinstance(value, str) else value
