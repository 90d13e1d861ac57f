"""``attentionseg serve``: the interactive session over HTTP, so that a GPU on another machine does the work.

The package is split so that a client needs neither torch nor FastAPI:

* :mod:`.codec` and :mod:`.patches` (numpy and the standard library only) - the wire format: a small binary
  packet (a JSON header and zlib-compressed arrays), and changed-region patches of label maps;
* :mod:`.client` (the standard library's ``urllib`` plus the two above) - what Slicer's module uses;
* :mod:`.calls`, :mod:`.config`, :mod:`.jobs`, :mod:`.store`, :mod:`.app`, :mod:`.run` - the server (FastAPI
  and uvicorn, the ``server`` extra): which session methods a client may call and with what, the limits, the
  one-job-at-a-time queue of the device, the sessions with their idle expiry and memory bound, the routes.

The HTTP API is described in ``docs/server-api.md``.
"""

from __future__ import annotations

API_PREFIX = "/v1"
DEFAULT_PORT = 8765
PACKET_TYPE = "application/x-attentionseg"
#: what this server does beyond the first API (``GET /v1/health``'s ``features``): a client asks only for
#: those its server lists, so that a newer client still works with an older server
FEATURES = ("previews", "model_options")
