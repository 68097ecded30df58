#!/usr/bin/env bash
# Run a command in a fresh network namespace where only loopback is up, when this user may make
# one (root, with unshare and ip): the tests that start Ray clusters, kill nodes and run an
# MLflow server then cannot reach, or be reached from, any other address. Elsewhere the command
# runs as it is, and those tests skip themselves (tests/test_cluster.py).
set -euo pipefail
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null && command -v ip >/dev/null && unshare -n true 2>/dev/null; then
  exec unshare -n bash -c 'ip link set lo up && exec "$@"' bash "$@"
fi
echo "note: not in a loopback-only network namespace (needs root, unshare and ip): the multi-node cluster tests skip" >&2
exec "$@"
