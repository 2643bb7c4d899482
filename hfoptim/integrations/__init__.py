"""Integrations with training frameworks (imported on demand: they import those frameworks)."""
