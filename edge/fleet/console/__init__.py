"""``edge-voice fleet console``: a web page for one fleet (one broker, one prefix).

The console process holds the fleet's own MQTT connections (``edge.fleet.client``): one follows
every device's retained status and events into a model (``model``), one sends the page's
commands with ``edge.fleet.cmd``'s request/response. Pages get the model as a snapshot and then
its updates as server-sent events (``stream``); commands come back as a POST limited to the
usual actions (``commands``). Every request but the login page and the static files needs a
session from a login, or a bearer token (``auth``). ``server`` is the HTTP side (the standard
library's threading server), ``app`` wires it together, ``static/`` is the page itself (plain
HTML, CSS and JavaScript: no build step, nothing fetched from elsewhere).

``import edge.fleet.console`` imports nothing heavy; paho is imported when the console starts.
"""

from __future__ import annotations

from edge.fleet.errors import FleetError


class ConsoleError(FleetError):
    code = "console.error"
