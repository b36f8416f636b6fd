"""Node.js tools the end-to-end tests install with npm (Claude Code, Codex CLI), globally into a
folder kept between runs (TOKENGATE_NPM_CACHE, default ~/.cache/tokengate-tests/npm)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# npm's global prefix and download cache, kept between runs.
NPM_FOLDER = Path(
    os.environ.get("TOKENGATE_NPM_CACHE", Path.home() / ".cache" / "tokengate-tests" / "npm")
)


def npm_environment(tool: str) -> dict[str, str]:
    """npm installing globally into the cache folder, its bin first on the PATH; the test is
    skipped, naming `tool`, where npm is not installed."""
    if shutil.which("npm") is None:
        pytest.skip(f"npm is not installed: {tool} cannot be installed to run behind the gate")
    prefix = NPM_FOLDER / "prefix"
    return {
        "NPM_CONFIG_PREFIX": str(prefix),
        "npm_config_cache": str(NPM_FOLDER / "cache"),
        "npm_config_update_notifier": "false",
        "PATH": f"{prefix / 'bin'}{os.pathsep}{os.environ['PATH']}",
    }


def with_npm(env: dict[str, str], npm_env: dict[str, str]) -> dict[str, str]:
    return {**env, **npm_env, "PATH": f"{npm_env['PATH']}{os.pathsep}{env['PATH']}"}
