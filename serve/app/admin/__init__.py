"""The admin API (/admin/v1/…): the expert lifecycle on a running service, behind its own keys."""
