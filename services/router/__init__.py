"""The router service: model catalogue, worker registry and control plane (tokenmesh.router.v1)."""
