"""The ``live`` sink: a real-time dashboard and traffic alerts, computed from the parsed rows.

It is a sink like any other, so it sees every parsed batch once, with no second parse
and no database round trip, and it acknowledges only what it has counted. Its write
(``sink``) updates bounded event-time aggregates (``windows``), judges the alert rules
(``alerts``) and queues webhook posts (``webhook``); its routes serve ``/dashboard``, the
JSON behind it (``/api/live``, see ``api``) and the page's static files from the package.
"""

from __future__ import annotations

from clickflow.api import AnySink
from clickflow.hookspecs import Register, hookimpl


@hookimpl
def register_sinks(register: Register[AnySink]) -> None:
    register("clickflow_live.sink:LiveSink", "live")  # its module loads only for a pipeline that uses it
