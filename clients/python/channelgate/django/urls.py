"""Routes for the authorizer view:

    path("api/channelgate/", include("channelgate.django.urls"))

serves it at `/api/channelgate/authorize/`, the URL to give `--authorizer`.
"""

from django.urls import path

from .views import authorize

app_name = "channelgate"

urlpatterns = [path("authorize/", authorize, name="authorize")]
