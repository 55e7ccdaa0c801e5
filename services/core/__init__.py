"""Shared service platform: server bootstrap, settings, errors, telemetry."""
