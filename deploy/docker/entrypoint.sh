#!/bin/sh
# Runs one tokenmesh process by name; exec so signals (SIGTERM drain) reach it.
set -eu
case "${1:-}" in
  auth|router|usage|jobs|inference) exec "tokenmesh-$1" ;;
  # With TOKENMESH_PKI_DIR it also writes Envoy's SDS files to /tmp/envoy-sds.
  # Envoy runs as its child: on SIGTERM it drains Envoy first, so streams finish
  # (up to TOKENMESH_EDGE_DRAIN_SECONDS; Kubernetes' preStop runs `python -m
  # gateway drain` before that SIGTERM).
  edge) exec python -m gateway run --out /tmp/envoy.yaml ;;
  # A local CA and every identity's leaf in $TOKENMESH_PKI_DIR (this
  # container's alone), re-issued hourly when due; for compose, where no
  # cert-manager issues them. Extra args go to `python -m services.core.pki`
  # (compose: --export, each identity's own files into its own volume).
  pki)
    shift
    dir="${TOKENMESH_PKI_DIR:?pki needs TOKENMESH_PKI_DIR}"
    nap=
    trap 'kill $nap 2>/dev/null; exit 0' TERM INT
    while :; do
      python -m services.core.pki "$dir" "$@"
      sleep 3600 & nap=$!
      wait $nap
    done ;;
  *) echo "usage: tokenmesh-entrypoint auth|router|usage|jobs|inference|edge|pki" >&2; exit 2 ;;
esac
