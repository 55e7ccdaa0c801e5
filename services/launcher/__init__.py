"""Starts and stops the whole local mesh: Redis, services, Envoy.

Used by `make run` (`python -m services.launcher`) and by the test harness,
so what tests run is exactly what a developer runs.
"""
