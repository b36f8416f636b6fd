"""A mitmdump script with TokenGate's shape and none of its work: the benchmark's `noop` target.

mitmproxy calls every addon for every event (and an `update` after each flow event), walking
the script's addon list each time; how much that costs depends on how many addon objects there
are and which hooks they define, not on what the hooks do. This script registers as many
objects as `pipeline.build` returns, in the same order, each defining the same hook names as
its TokenGate counterpart, sync where that one is sync and `async def` where it is async, and
each doing nothing. Plain mitmdump beside mitmdump with this script is the floor mitmproxy's
addon dispatch puts under TokenGate: the part of the gap that is not TokenGate's code.

    mitmdump --mode reverse:http://127.0.0.1:4010 -s scripts/bench/noop_addons.py
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from mitmproxy import hooks
from tokengate_core import pipeline
from tokengate_core.gate import Gate

# Where the hooks are declared: load; flow, websocket, tcp, udp and dns events; connections.
HOOK_MODULES = ("mitmproxy.addonmanager", "mitmproxy.proxy.layers", "mitmproxy.proxy.server_hooks")


def hook_names() -> set[str]:
    """Every event mitmproxy may call an addon with (its hook classes register on import)."""
    for module in HOOK_MODULES:
        importlib.import_module(module)
    return set(hooks.all_hooks)


def shape(addon: object) -> dict[str, bool]:
    """The hooks `addon` defines, each mapped to whether it is a coroutine function."""
    return {
        name: inspect.iscoroutinefunction(getattr(addon, name))
        for name in sorted(hook_names())
        if callable(getattr(addon, name, None))
    }


def _noop(is_async: bool) -> Callable[..., Any]:
    if is_async:

        async def hook(self, *args: object) -> None:
            pass

    else:

        def hook(self, *args: object) -> None:
            pass

    return hook


def noop_twin(addon: object) -> object:
    """An object of a new class named after `addon`'s, with its hooks as no-ops."""
    cls = type(addon)
    methods = {name: _noop(is_async) for name, is_async in shape(addon).items()}
    doc = f"{cls.__name__}'s hooks, doing nothing."
    return type(f"Noop{cls.__name__}", (), {"__doc__": doc, **methods})()


addons = [noop_twin(addon) for addon in pipeline.build(Gate())]
