#!/usr/bin/env bash
# The Redis tests start their own redis-server (and a local Redis Cluster, formed with
# redis-cli); this installs Debian's packages when either is missing.
set -euo pipefail
command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "redis-server or redis-cli is not installed and this is not a Debian-like system:" \
         "install Redis 6+ yourself, or the Redis tests will be skipped (they fail under CI=true)." >&2
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
else
    echo "redis-server or redis-cli is not installed and installing them needs root:" \
         "sudo apt-get install redis-server redis-tools (the Redis tests are skipped until then)." >&2
    exit 0
fi
echo "installing redis-server and redis-tools (redis-cli) from Debian's packages..." >&2
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends \
    redis-server redis-tools >/dev/null
command -v redis-server >/dev/null && command -v redis-cli >/dev/null
