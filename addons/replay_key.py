"""Client replay as a caller: `mitmdump -s addons/replay_key.py -s addons/tokengate.py -C FILE`.

Saved flows never hold the caller's key, so a replayed request would get 401 from the gate. This
addon, loaded before TokenGate, gives the key in the environment variable TOKENGATE_REPLAY_KEY
(an environment variable, not an option, so it is never logged) to each client-replayed request
that the gate governed when it was captured: those carry the gate's saved note, which this addon
sees before TokenGate's Router drops it. Any other flow passes the gate untouched, key and all, so
it gets none: the key would go to that upstream and into saved flows.
mitmproxy's own `modify_headers` cannot do this: script addons run before it.
"""

from __future__ import annotations

import logging
import os

from mitmproxy import http
from tokengate_core import notes

ENV = "TOKENGATE_REPLAY_KEY"


class ReplayKey:
    def running(self) -> None:
        if not os.environ.get(ENV):
            logging.warning("replay_key: %s is not set; replayed requests carry no key", ENV)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        key = os.environ.get(ENV)
        if key and flow.is_replay == "request" and notes.of(flow) is not None:
            flow.request.headers["authorization"] = f"Bearer {key}"


addons = [ReplayKey()]
