#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 found on this machine and installs TokenGate into it.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --dev    plus the test tools (pytest, openai SDK, hypothesis, ruff)
# Re-running is cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

suitable() {
    "$1" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local candidate version root
    for candidate in ${TOKENGATE_PYTHON:-} python3 python3.14 python3.13 python3.12 python; do
        if command -v "$candidate" >/dev/null 2>&1 && suitable "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    # pyenv keeps other versions out of PATH unless selected; look at them directly.
    if command -v pyenv >/dev/null 2>&1; then
        root=$(pyenv root)
        for version in $(pyenv versions --bare 2>/dev/null | sort -rV); do
            candidate="$root/versions/$version/bin/python3"
            if [ -x "$candidate" ] && suitable "$candidate"; then
                echo "$candidate"
                return 0
            fi
        done
    fi
    return 1
}

if [ -x .venv/bin/python ] && ! suitable .venv/bin/python; then
    echo "setup: .venv has an old Python; recreating it" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    if ! python=$(find_python); then
        cat >&2 <<'MSG'
setup: no Python 3.12 or newer (with the venv module) was found.
TokenGate needs mitmproxy 12, which needs Python >= 3.12. Install one, for example:
  Debian/Ubuntu:  apt-get install python3.12 python3.12-venv   (or a newer python3)
  pyenv:          pyenv install 3.12
  macOS:          brew install python@3.12
or point TOKENGATE_PYTHON at an interpreter, then run this again.
MSG
        exit 1
    fi
    echo "setup: creating .venv with $python ($("$python" --version))"
    "$python" -m venv .venv
fi

stamp=".venv/.tokengate-installed"
project="$(cksum < pyproject.toml | tr -d ' ')"
want="$project$extras"
have="$(cat "$stamp" 2>/dev/null || true)"
# A dev install contains the runtime install.
if [ "$have" != "$want" ] && [ "$have" != "$project[dev]" ]; then
    echo "setup: installing TokenGate$extras into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".$extras"
    echo "$want" > "$stamp"
fi
