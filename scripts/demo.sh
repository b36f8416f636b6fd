#!/usr/bin/env bash
# Sets up TokenGate and runs it on the default quotas.yaml in front of the bundled mock OpenAI
# server (no credentials needed). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

GATE_PORT="${TOKENGATE_PORT:-8080}"
MOCK_PORT=4010  # the port quotas.yaml names for the mock provider
export TOKENGATE_MOCK_PROVIDER_KEY="${TOKENGATE_MOCK_PROVIDER_KEY:-sk-mock-provider-key}"
DEMO_KEY="tg-demo-key-for-the-bundled-mock-only"

.venv/bin/tokengate-mock --port "$MOCK_PORT" --quiet &
mock_pid=$!
gate_pid=""
stop() { kill $mock_pid $gate_pid 2>/dev/null || true; }
trap stop EXIT
trap 'exit 130' INT TERM

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
