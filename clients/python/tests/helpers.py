"""A real channelgate node, real WebSocket clients and access tokens, for the tests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

REPO = Path(__file__).resolve().parents[3]
JWT_SECRET = "test-jwt-secret"
API_KEY = "test-api-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_binary() -> Path:
    """CHANNELGATE_BIN, else the repository's debug build (built when missing)."""
    given = os.environ.get("CHANNELGATE_BIN")
    if given:
        return Path(given)
    binary = REPO / "target" / "debug" / "channelgate"
    if not binary.exists():
        subprocess.run(["cargo", "build", "--bin", "channelgate"], cwd=REPO, check=True)
    return binary


class Gateway:
    """One channelgate node on free ports, stopped by `stop()`."""

    def __init__(self, *args: str, log: Path, grpc_port: int | None = None) -> None:
        self.ws_port = free_port()
        self.grpc_port = grpc_port or free_port()
        self.args = args
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        command = [
            str(gateway_binary()),
            "--ws-addr",
            f"127.0.0.1:{self.ws_port}",
            "--grpc-addr",
            self.target,
            "--jwt-secret",
            JWT_SECRET,
            "--api-key",
            API_KEY,
            *self.args,
        ]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"channelgate exited at start: {self.log.read_text()}")
            try:
                url = f"http://127.0.0.1:{self.ws_port}/readyz"
                with urllib.request.urlopen(url, timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"channelgate not ready within 30 s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def socket(self, token: str, web_socket_id: str | None = None) -> Socket:
        """An authenticated socket (`web_socket_id` random unless given)."""
        web_socket_id = web_socket_id or uuid.uuid4().hex[:12]
        sock = self.open(token, web_socket_id)
        first = sock.recv()
        assert first["type"] == "authentication" and first["success"], first
        return sock

    def open(self, token: str, web_socket_id: str) -> Socket:
        url = (
            f"ws://127.0.0.1:{self.ws_port}/ws/core/"
            f"?jwt_token={token}&web_socket_id={web_socket_id}"
        )
        # Entered by hand (Socket.close exits it): websockets wants a managed connection.
        return Socket(connect(url, open_timeout=5).__enter__(), web_socket_id)


class Socket:
    """A browser's socket: JSON frames in and out."""

    def __init__(self, connection: ClientConnection, web_socket_id: str) -> None:
        self.connection = connection
        self.web_socket_id = web_socket_id

    def send(self, frame: dict[str, Any]) -> None:
        self.connection.send(json.dumps(frame))

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(self.connection.recv(timeout=timeout))
        return frame

    def subscribe(self, page: str, **parameters: Any) -> dict[str, Any]:
        """Subscribes and returns the answer (`page_add` or `page_rejected`)."""
        self.send({"page": page, **parameters})
        return self.recv()

    def nothing(self, within: float = 0.3) -> None:
        """Asserts that no frame arrives within `within` seconds."""
        try:
            frame = self.recv(timeout=within)
        except TimeoutError:
            return
        raise AssertionError(f"{self.web_socket_id} got {frame}")

    def closed(self, within: float = 5.0) -> int | None:
        """Waits for the close and returns its code; frames before it are dropped."""
        deadline = time.monotonic() + within
        try:
            while time.monotonic() < deadline:
                self.connection.recv(timeout=deadline - time.monotonic())
        except ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
        raise AssertionError(f"{self.web_socket_id} still open after {within} s")

    def close(self) -> None:
        self.connection.close()


def token(
    user_id: int,
    issued_at: int | None = None,
    token_id: str | None = None,
    lifetime: int = 600,
) -> str:
    """An HS256 access token as the backend issues them."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "token_type": "access",
        "exp": now + lifetime,
        "user_id": user_id,
    }
    claims["iat"] = now if issued_at is None else issued_at
    claims["jti"] = token_id or uuid.uuid4().hex
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(JWT_SECRET.encode(), f"{header}.{body}".encode(), hashlib.sha256)
    return f"{header}.{body}.{_b64(signature.digest())}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
