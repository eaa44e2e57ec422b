"""ASGI entry point, served by daphne: HTTP goes to Django (404 for everything),
WebSockets on `/ws/core/` to the Baserow-style consumer."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchpeer.settings")

from django.core.asgi import get_asgi_application  # noqa: E402

# Set Django up before importing anything that touches models or settings.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import path  # noqa: E402

from benchpeer.consumers import CoreConsumer  # noqa: E402


def allow_policy_violation_close():
    """Lets the consumer close with 1008 under daphne, as channelgate does on a bad token.

    Daphne closes through autobahn's sendClose, which refuses every code but 1000 and
    3000-4999 (an exception inside the app, the client sees 1011). RFC 6455 lets a server
    send 1008, so that one code is sent as a close frame directly.
    """
    from daphne.ws_protocol import WebSocketProtocol

    server_close = WebSocketProtocol.serverClose

    def close(self, code=None):
        if code == 1008:
            self.sendCloseFrame(code=code, isReply=False)
        else:
            server_close(self, code)

    WebSocketProtocol.serverClose = close


allow_policy_violation_close()

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": URLRouter([path("ws/core/", CoreConsumer.as_asgi())]),
    }
)
