"""A stand-in for the parts of Baserow that channelgate.baserow uses: the page registry
(`page_registry.get`, `does_not_exist_exception_class`, page types with `parameters` and
`can_add(user, web_socket_id, **parameters)`) and the root routes
(`baserow.config.urls.urlpatterns`). The test project plays a Baserow backend with them,
answering from its own tables."""
