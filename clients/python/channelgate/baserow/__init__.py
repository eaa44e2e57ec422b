"""Baserow's own permission checks, for the authorizer view's settings, and its routes
with the authorizer view added (`channelgate.baserow.urls`):

    ROOT_URLCONF = "channelgate.baserow.urls"
    CHANNELGATE_SUBSCRIBE_CHECK = "channelgate.baserow.can_subscribe"
    CHANNELGATE_CONNECT_CHECK = "channelgate.baserow.can_connect"

Baserow is imported when a check runs, never before, so this module loads anywhere.
"""

from __future__ import annotations

from typing import Any

from ..django.views import active_user, issued_before_password_change


def can_subscribe(
    user: Any,
    web_socket_id: str,
    page: str,
    parameters: dict[str, Any],
    group: str = "",
) -> bool:
    """The page type's own `can_add(user, web_socket_id, **parameters)`, as Baserow's
    consumer asks it; an unknown page type is refused."""
    from baserow.ws.registries import page_registry

    try:
        page_type = page_registry.get(page)
    except page_registry.does_not_exist_exception_class:
        return False
    known = {name: parameters.get(name) for name in page_type.parameters}
    return bool(page_type.can_add(user, web_socket_id, **known))


def can_connect(
    user_id: int,
    web_socket_id: str,
    token_issued_at: int | None,
    token_id: str | None,
) -> bool:
    """What Baserow checks on a token: an active user, not scheduled for deletion, and
    a token issued after the last password change (`profile.last_password_change`)."""
    user = active_user(user_id)
    if user is None or issued_before_password_change(user, token_issued_at):
        return False
    profile = getattr(user, "profile", None)
    return not getattr(profile, "to_be_deleted", False)
