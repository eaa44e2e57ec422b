"""Settings of the Django Channels benchmark peer.

No database, no templates, no sessions: only what Channels needs to serve the
`/ws/core/` consumer and to run `publisher.py` against the same channel layer.
"""

import os

from django.core.exceptions import ImproperlyConfigured

REDIS_URL = os.environ.get("REDIS_URL", "")
if not REDIS_URL:
    raise ImproperlyConfigured("REDIS_URL must be set, e.g. redis://127.0.0.1:6391/0")

# Shared HS256 key of the access tokens. Empty refuses every token but `anonymous`;
# run.sh requires it. publisher.py does not need it.
JWT_SECRET = os.environ.get("JWT_SECRET", "")

# Not used for anything security relevant here (no sessions, no CSRF), but Django wants one.
SECRET_KEY = "channelgate-bench-django-peer"
DEBUG = False
ALLOWED_HOSTS = ["*"]

INSTALLED_APPS = ["channels"]
MIDDLEWARE = []
ROOT_URLCONF = "benchpeer.urls"
DATABASES = {}
USE_TZ = True

ASGI_APPLICATION = "benchpeer.asgi.application"

# channels_redis with its defaults, spelled out: capacity 100, expiry 60 s, group_expiry
# one day. All sockets of one daphne process share one Redis inbox key (a group_send
# writes one message per process, listing its sockets), so `capacity` bounds the
# group_sends waiting for the whole process, and each socket's local queue holds 100 more.
# Past that, messages are dropped (channels_redis only logs "channels over capacity" at
# info level): a publish rate the process cannot keep up with shows in the benchmark as
# lost events, as it would in Baserow.
#
# socket_timeout=None: redis-py 8 made 5 s the default read timeout, shorter than
# channels_redis's 5 s blocking BZPOPMIN, so every idle consumer died with "Timeout
# reading from ..." (close 1011) after about 5 s (django/channels_redis issue #422).
# None is redis-py 7's default: wait as long as the blocking pop does.
#
# max_connections=1000: redis-py 8 caps an asyncio ConnectionPool at 100 connections by
# default (it was 2**31 before redis/redis-py#4082) and raises MaxConnectionsError past that instead of waiting.
# channels_redis takes a pooled connection for each command it sends, so the pool holds
# as many connections as there are Redis commands in flight at once, not one per socket:
# one BZPOPMIN shared by the whole process, plus one for each consumer in the middle of
# its group_add (connect and page subscribe), that is about one per handshake in flight.
# The load generator keeps 256 (512 in the storm) handshakes in flight, so 100 broke
# opening 10,000 sockets; 1000 leaves room above that, stays far below Redis's
# maxclients (10,000), and 19,000 sockets plus 1000 fits daphne's 20,000 open files.
# (The option is passed through to redis-py's ConnectionPool.from_url.)
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {
            "hosts": [
                {"address": REDIS_URL, "socket_timeout": None, "max_connections": 1000}
            ],
            "capacity": 100,
            "expiry": 60,
            "group_expiry": 86400,
        },
    }
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
}
