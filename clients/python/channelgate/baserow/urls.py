"""Baserow's routes plus channelgate's authorizer at `/api/channelgate/authorize/`, so
that a deployment adds the view with a setting (`ROOT_URLCONF`), not a code change."""

from baserow.config.urls import urlpatterns as baserow_urlpatterns
from django.urls import include, path

urlpatterns = [
    path("api/channelgate/", include("channelgate.django.urls")),
    *baserow_urlpatterns,
]
