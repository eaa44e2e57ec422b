from django.conf import settings
from django.db import models


class Profile(models.Model):
    """Baserow's `UserProfile`: the fields channelgate's connect checks read."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="profile"
    )
    last_password_change = models.DateTimeField(null=True, default=None)
    to_be_deleted = models.BooleanField(default=False)


class TableAccess(models.Model):
    """The project's permissions: this user may see this table."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    table_id = models.IntegerField()
