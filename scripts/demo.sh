#!/usr/bin/env bash
# Sets up TokenGate and runs it on the default quotas.yaml in front of the bundled mock OpenAI
# server (no credentials needed). Ctrl-C stops both. TOKENGATE_PORT chooses the gate's port.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

GATE_PORT="${TOKENGATE_PORT:-8080}"
MOCK_PORT=4010  # the port quotas.yaml names for the mock provider
export TOKENGATE_MOCK_PROVIDER_KEY="${TOKENGATE_MOCK_PROVIDER_KEY:-sk-mock-provider-key}"
DEMO_KEY="tg-demo-key-for-the-bundled-mock-only"

busy() {  # true when something already listens on 127.0.0.1:$1
    .venv/bin/python - "$1" <<'PY'
import socket, sys
with socket.socket() as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        sys.exit(0)
sys.exit(1)
PY
}
if busy "$GATE_PORT"; then
    echo "demo: port $GATE_PORT (TokenGate) is busy; choose another: TOKENGATE_PORT=8081 $0" >&2
    exit 1
fi
if busy "$MOCK_PORT"; then
    echo "demo: port $MOCK_PORT (the mock provider, named in quotas.yaml) is busy;" \
        "stop what listens there (a demo still running?) and try again" >&2
    exit 1
fi

.venv/bin/tokengate-mock --port "$MOCK_PORT" --quiet &
mock_pid=$!
gate_pid=""
stop() { kill $mock_pid $gate_pid 2>/dev/null || true; }
trap stop EXIT
trap 'exit 130' INT TERM
for _ in $(seq 100); do  # up to 10 s for the mock to listen
    busy "$MOCK_PORT" && break
    kill -0 $mock_pid 2>/dev/null || exit 1  # it said why
    sleep 0.1
done

cat <<MSG

TokenGate is starting on http://127.0.0.1:$GATE_PORT in front of the mock at http://127.0.0.1:$MOCK_PORT.
The default quota is 100 total tokens per minute for the demo key. In another terminal:

  # 1) allowed: 200 with X-RateLimit-Remaining
  curl -si http://127.0.0.1:$GATE_PORT/rate-limited-proxy/chat/completions \\
    -H "Authorization: Bearer $DEMO_KEY" -H "Content-Type: application/json" \\
    -d '{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}'
  # 2) the same again right away: 429 with X-RateLimit-Reset (epoch seconds)
  # 3) without a key: 401, never forwarded
  curl -si http://127.0.0.1:$GATE_PORT/rate-limited-proxy/chat/completions -d '{}'
  # what the mock (the "provider") received:
  curl -s http://127.0.0.1:$MOCK_PORT/mock/stats

  # or with the openai SDK:
  #   OpenAI(base_url="http://127.0.0.1:$GATE_PORT/rate-limited-proxy", api_key="$DEMO_KEY")

MSG
.venv/bin/mitmdump --listen-host 127.0.0.1 -p "$GATE_PORT" \
    --mode "reverse:http://127.0.0.1:$MOCK_PORT" -s addons/tokengate.py "$@" &
gate_pid=$!
wait "$gate_pid"
