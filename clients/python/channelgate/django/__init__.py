"""Django integration: the Channels layer (`CHANNEL_LAYERS`) and the authorizer view.

    CHANNEL_LAYERS = {"default": {"BACKEND": "channelgate.django.ChannelgateLayer",
                                  "CONFIG": {"target": "channelgate:50051", ...}}}

The view lives in `channelgate.django.views` (routes: `channelgate.django.urls`).
"""

from .layer import BASEROW_TYPES, ChannelgateLayer

__all__ = ["BASEROW_TYPES", "ChannelgateLayer"]
