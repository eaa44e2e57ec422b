from django.http import HttpResponse
from django.urls import path

# One route of the backend's own, which channelgate.baserow.urls keeps beside its view.
urlpatterns = [path("api/settings/", lambda request: HttpResponse("backend"))]
