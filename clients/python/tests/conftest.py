"""Fixtures: a small Django project (settings made here, its authorizer view served over
HTTP in a thread) and a real channelgate node that asks that view before subscribes."""

from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import django
import pytest
from django.conf import settings
from helpers import API_KEY, Gateway, Socket, free_port, token

sys.path.insert(0, str(Path(__file__).parent / "project"))

AUTHORIZER_SECRET = "test-authorizer-secret"
LAYER = "channelgate.django.ChannelgateLayer"


@dataclass
class Backend:
    """The running test project: its URL and the users it knows."""

    url: str
    grpc_port: int
    users: list[Any]

    @property
    def authorizer_url(self) -> str:
        return f"{self.url}/api/channelgate/authorize/"


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    grpc_port = free_port()
    settings.configure(
        SECRET_KEY="test",
        ALLOWED_HOSTS=["127.0.0.1"],
        USE_TZ=True,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "accounts"],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": str(tmp_path_factory.mktemp("db") / "db.sqlite3"),
                "OPTIONS": {"timeout": 20},
            }
        },
        ROOT_URLCONF="channelgate.baserow.urls",
        MIDDLEWARE=[],
        CHANNEL_LAYERS={
            # What a Baserow deployment sets: its broadcasts go to channelgate.
            "default": {
                "BACKEND": LAYER,
                "CONFIG": {"target": f"127.0.0.1:{grpc_port}", "api_key": API_KEY},
            },
            # A gateway that is not there: the layer gives up on a call after a second.
            "down": {
                "BACKEND": LAYER,
                "CONFIG": {
                    "target": f"127.0.0.1:{free_port()}",
                    "api_key": API_KEY,
                    "timeout": 0.3,
                    "give_up_after": 1.0,
                    "exit_timeout": 0.2,
                },
            },
        },
        CHANNELGATE_AUTHORIZER_SECRET=AUTHORIZER_SECRET,
        CHANNELGATE_SUBSCRIBE_CHECK="channelgate.baserow.can_subscribe",
        CHANNELGATE_CONNECT_CHECK="channelgate.baserow.can_connect",
    )
    django.setup()

    from accounts.models import Profile
    from django.contrib.auth import get_user_model
    from django.core.handlers.wsgi import WSGIHandler
    from django.core.management import call_command
    from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler

    call_command("migrate", run_syncdb=True, verbosity=0)
    users = [get_user_model().objects.create_user(f"user{i}") for i in range(1, 4)]
    for user in users:
        Profile.objects.create(user=user)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadedWSGIServer(("127.0.0.1", 0), Quiet)
    server.set_app(WSGIHandler())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    yield Backend(f"http://{host}:{port}", grpc_port, users)
    server.shutdown()


@pytest.fixture(scope="session")
def gateway(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """The node behind CHANNEL_LAYERS["default"], asking the project before subscribes."""
    node = Gateway(
        "--authorizer",
        backend.authorizer_url,
        "--authorizer-secret",
        AUTHORIZER_SECRET,
        log=tmp_path_factory.mktemp("gateway") / "channelgate.log",
        grpc_port=backend.grpc_port,
    )
    yield node
    node.stop()


_tables = itertools.count(1)


@pytest.fixture
def table(backend: Backend) -> int:
    """A table id of this test's own, which users 1 and 2 (not 3) may see."""
    from accounts.models import TableAccess

    table_id = next(_tables)
    for user in backend.users[:2]:
        TableAccess.objects.create(user=user, table_id=table_id)
    return table_id


@pytest.fixture
def connect(gateway: Gateway) -> Iterator[Callable[..., Socket]]:
    """Opens an authenticated socket of a user (None: anonymous); closed after the test."""
    opened: list[Socket] = []

    def open_socket(user: Any, web_socket_id: str | None = None) -> Socket:
        sock = gateway.socket(
            "anonymous" if user is None else token(user.id), web_socket_id
        )
        opened.append(sock)
        return sock

    yield open_socket
    for sock in opened:
        sock.close()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server of the test's own, on a free port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make deps installs it)")
    port = free_port()
    server = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}"
    server.terminate()
    server.wait(5)
