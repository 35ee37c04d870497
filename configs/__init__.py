"""Typed settings: YAML defaults in `defaults.yaml`, overridden by environment variables."""

from configs.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
