#!/bin/sh
# Runs one tokenmesh process by name; exec so signals (SIGTERM drain) reach it.
set -eu
case "${1:-}" in
  auth|router|usage|inference) exec "tokenmesh-$1" ;;
  edge) exec python -m gateway run --out /tmp/envoy.yaml ;;
  *) echo "usage: tokenmesh-entrypoint auth|router|usage|inference|edge" >&2; exit 2 ;;
esac
