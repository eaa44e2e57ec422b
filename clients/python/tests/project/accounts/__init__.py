"""The test project's data: Baserow's user profile fields and who may see which table."""
