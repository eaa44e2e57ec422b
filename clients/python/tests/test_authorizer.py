"""The authorizer view, asked over HTTP as channelgate asks it, and by a real node."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any

import pytest
from conftest import AUTHORIZER_SECRET
from helpers import Gateway, token


def ask(
    backend, question: dict[str, Any], secret: str | None = AUTHORIZER_SECRET
) -> tuple[int, dict[str, Any]]:
    """POSTs a question as channelgate does; returns the status and the JSON answer."""
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Channelgate-Secret"] = secret
    request = urllib.request.Request(
        backend.authorizer_url, json.dumps(question).encode(), headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def subscribe(user_id: int, table_id: int, **extra: Any) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "web_socket_id": "tab-1",
        "page": "table",
        "parameters": {"table_id": table_id},
        "group": f"table-{table_id}",
        **extra,
    }


def connect_question(user_id: int, issued_at: int | None) -> dict[str, Any]:
    return {
        "action": "connect",
        "user_id": user_id,
        "web_socket_id": "tab-1",
        "token_issued_at": issued_at,
        "token_id": "jti-1",
    }


@pytest.fixture
def profile(backend):
    """User one's profile, restored after the test."""
    from accounts.models import Profile

    user = backend.users[0]
    yield Profile.objects.get(user=user)
    Profile.objects.filter(user=user).update(last_password_change=None, to_be_deleted=False)
    type(user).objects.filter(pk=user.pk).update(is_active=True)


def test_subscribe_answers_come_from_the_page_types_can_add(backend, table):
    one, _, three = backend.users
    assert ask(backend, subscribe(one.id, table, action="subscribe")) == (
        200,
        {"allowed": True},
    )
    # A gateway without the connect check sends no action: still a subscribe.
    assert ask(backend, subscribe(one.id, table)) == (200, {"allowed": True})
    assert ask(backend, subscribe(three.id, table)) == (200, {"allowed": False})
    assert ask(backend, subscribe(0, table)) == (200, {"allowed": False})
    assert ask(backend, subscribe(10_000, table)) == (200, {"allowed": False})
    unknown = dict(subscribe(one.id, table), page="nowhere")
    assert ask(backend, unknown) == (200, {"allowed": False})
    anonymous_view = dict(
        subscribe(0, table), page="view", parameters={"slug": "public"}, group="view-public"
    )
    assert ask(backend, anonymous_view) == (200, {"allowed": True})


def test_the_backends_own_routes_stay_beside_the_view(backend):
    with urllib.request.urlopen(f"{backend.url}/api/settings/", timeout=5) as answer:
        assert answer.read() == b"backend"


def test_a_wrong_or_missing_secret_is_refused(backend, table):
    assert ask(backend, subscribe(backend.users[0].id, table), secret="guess")[0] == 403
    assert ask(backend, subscribe(backend.users[0].id, table), secret=None)[0] == 403
    status, answer = ask(backend, connect_question(backend.users[0].id, None), secret="")
    assert status == 403 and "allowed" not in answer


def test_unreadable_questions_are_400s(backend):
    status, answer = ask(backend, {"action": "subscribe", "user_id": "1"})
    assert status == 400 and "user_id" in answer["error"]
    status, answer = ask(backend, {"action": "delete", "user_id": 1})
    assert status == 400 and "delete" in answer["error"]


def test_connect_checks_the_user_and_the_password_change(backend, profile):
    user = profile.user
    now = int(time.time())
    assert ask(backend, connect_question(user.id, now)) == (200, {"allowed": True})
    assert ask(backend, connect_question(10_000, now)) == (200, {"allowed": False})

    profile.last_password_change = datetime.fromtimestamp(now, timezone.utc)
    profile.save()
    assert ask(backend, connect_question(user.id, now - 60)) == (200, {"allowed": False})
    assert ask(backend, connect_question(user.id, None)) == (200, {"allowed": False})
    assert ask(backend, connect_question(user.id, now)) == (200, {"allowed": True})

    profile.to_be_deleted = True
    profile.save()
    assert ask(backend, connect_question(user.id, now)) == (200, {"allowed": False})
    profile.to_be_deleted = False
    profile.save()
    type(user).objects.filter(pk=user.pk).update(is_active=False)
    assert ask(backend, connect_question(user.id, now)) == (200, {"allowed": False})


def test_the_gateway_asks_the_view_before_a_subscribe(backend, connect, table):
    allowed = connect(backend.users[0]).subscribe("table", table_id=table)
    assert allowed == {
        "type": "page_add",
        "page": "table",
        "parameters": {"table_id": table},
    }
    denied = connect(backend.users[2]).subscribe("table", table_id=table)
    assert denied["type"] == "page_rejected" and denied["reason"] == "permission_denied"


def test_the_gateway_refuses_a_token_issued_before_a_password_change(
    backend, profile, tmp_path
):
    node = Gateway(
        "--authorizer",
        backend.authorizer_url,
        "--authorizer-secret",
        AUTHORIZER_SECRET,
        "--authorize-connect",
        log=tmp_path / "channelgate.log",
    )
    try:
        user = profile.user
        changed = datetime.now(timezone.utc).replace(microsecond=0)
        profile.last_password_change = changed
        profile.save()
        issued = int(changed.timestamp())

        stale = node.open(token(user.id, issued_at=issued - 3600), "stale-tab")
        assert stale.recv() == {
            "type": "authentication",
            "success": False,
            "web_socket_id": None,
        }
        assert stale.closed() == 1008

        fresh = node.socket(token(user.id, issued_at=issued + 1), "fresh-tab")
        fresh.send({"type": "ping"})
        assert fresh.recv() == {"type": "pong"}
        fresh.close()
    finally:
        node.stop()


def test_a_token_older_than_the_change_is_refused_even_by_a_second(backend, profile):
    user = profile.user
    changed = datetime.now(timezone.utc).replace(microsecond=500_000)
    profile.last_password_change = changed
    profile.save()
    second = int(changed.timestamp())
    # iat has whole seconds: the same second is not older (as in Baserow).
    assert ask(backend, connect_question(user.id, second)) == (200, {"allowed": True})
    assert ask(backend, connect_question(user.id, second - 1)) == (200, {"allowed": False})


def test_a_presence_space_the_project_names_is_in_the_answer(backend, table):
    from django.test import override_settings

    def space(user: Any, page: str, parameters: dict[str, Any], group: str) -> str | None:
        return "table-7" if page == "view" else None

    view = dict(subscribe(0, table), page="view", parameters={"slug": "public"})
    with override_settings(CHANNELGATE_PRESENCE_SPACE=space):
        assert ask(backend, view) == (200, {"allowed": True, "presence_space": "table-7"})
        one = backend.users[0]
        assert ask(backend, subscribe(one.id, table)) == (200, {"allowed": True})
        # A denied page joins nothing.
        assert ask(backend, subscribe(backend.users[2].id, table)) == (
            200,
            {"allowed": False},
        )
