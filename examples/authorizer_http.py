#!/usr/bin/env python3
"""An HTTP authorizer for channelgate, in plain Python (standard library only).

channelgate asks before a socket may subscribe to a page:

    POST /authorize
    X-Channelgate-Secret: <--authorizer-secret>
    {"action": "subscribe", "user_id": 1, "web_socket_id": "...", "page": "table",
     "parameters": {"table_id": 5}, "group": "table-5"}

and, with --authorize-connect, once per connection of a signed-in user, before it is served:

    {"action": "connect", "user_id": 1, "web_socket_id": "...",
     "token_issued_at": 1700000000, "token_id": "..."}

and expects `{"allowed": true}` or `{"allowed": false}` with status 200. Anything else
(another status, a timeout, a body it cannot read) denies the page with reason
`authorizer_unavailable`: the gateway fails closed. `user_id` 0 is an anonymous socket.

Run it and point a gateway at it:

    python3 examples/authorizer_http.py --port 8001 --secret s3cret
    channelgate --dev --authorizer http://127.0.0.1:8001/authorize --authorizer-secret s3cret

In a Django backend the same is one view (add CSRF exemption, route it, and answer from
your own permission checks instead of the PERMISSIONS table below):

    import hmac, json
    from django.conf import settings
    from django.http import HttpResponseForbidden, JsonResponse
    from django.views.decorators.csrf import csrf_exempt
    from django.views.decorators.http import require_POST

    @csrf_exempt
    @require_POST
    def channelgate_authorize(request):
        secret = request.headers.get("X-Channelgate-Secret", "")
        if not hmac.compare_digest(secret, settings.CHANNELGATE_AUTHORIZER_SECRET):
            return HttpResponseForbidden()
        question = json.loads(request.body)
        if question.pop("action", "subscribe") == "connect":
            return JsonResponse({"allowed": may_connect(**question)})
        return JsonResponse({"allowed": may_subscribe(**question)})
"""

import argparse
import hmac
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Which tables each user may see: a stand-in for the backend's own permission checks.
PERMISSIONS = {
    1: {1, 2},
    2: {1},
}


def may_connect(user_id, web_socket_id, token_issued_at, token_id):
    """The connect check: is this a known, active user, and is the token still good (not
    issued before the user's last password change, say)?"""
    return user_id in PERMISSIONS


def may_subscribe(user_id, page, parameters, group, web_socket_id=None):
    """The decision. `parameters` are already validated by channelgate (ids are ints)."""
    if page in ("table", "row"):
        return parameters["table_id"] in PERMISSIONS.get(user_id, set())
    if page == "view":
        # A public view: check parameters["slug"] and parameters["token"] here.
        return True
    return False


class Handler(BaseHTTPRequestHandler):
    secret = ""

    def do_POST(self):
        given = self.headers.get("X-Channelgate-Secret", "")
        if self.secret and not hmac.compare_digest(given, self.secret):
            self.send_error(403, "wrong X-Channelgate-Secret")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
            question = json.loads(self.rfile.read(length))
            if question.pop("action", "subscribe") == "connect":
                allowed = bool(may_connect(**question))
            else:
                allowed = bool(may_subscribe(**question))
        except (ValueError, TypeError, KeyError) as error:
            self.send_error(400, f"unreadable question: {error}")
            return
        body = json.dumps({"allowed": allowed}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        sys.stderr.write("authorizer: " + format % args + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--secret", default="", help="expected X-Channelgate-Secret")
    args = parser.parse_args()
    Handler.secret = args.secret
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    # The first line of output is the URL to give channelgate's --authorizer.
    print(f"http://{args.host}:{server.server_port}/authorize", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
