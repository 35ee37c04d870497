"""Typed settings (YAML defaults in `defaults.yaml`, overridden by environment
variables) and the error hierarchy. The bottom layer: imports nothing of the project."""

from configs.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
