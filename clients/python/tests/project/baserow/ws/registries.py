from typing import Any


class PageTypeDoesNotExist(Exception):
    pass


class TablePageType:
    type = "table"
    parameters = ["table_id"]

    def can_add(
        self, user: Any, web_socket_id: str, table_id: Any = None, **_: Any
    ) -> bool:
        from accounts.models import TableAccess

        return bool(
            user.is_authenticated
            and TableAccess.objects.filter(user_id=user.id, table_id=table_id).exists()
        )


class PublicViewPageType:
    type = "view"
    parameters = ["slug", "token"]

    def can_add(self, user: Any, web_socket_id: str, slug: Any = None, **_: Any) -> bool:
        return slug == "public"


class PageRegistry:
    does_not_exist_exception_class = PageTypeDoesNotExist

    def __init__(self, *page_types: Any) -> None:
        self.registry = {page_type.type: page_type for page_type in page_types}

    def get(self, name: str) -> Any:
        try:
            return self.registry[name]
        except KeyError:
            raise PageTypeDoesNotExist(name) from None


page_registry = PageRegistry(TablePageType(), PublicViewPageType())
