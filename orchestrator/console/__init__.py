"""The web console: ``orchestrator console`` (docs/operations.md, "Console").

Server-rendered pages on the stdlib's HTTP server, templates in Jinja2, one process, no build
step: the list of workflows with filters and counts per status, a page per workflow (timeline,
steps and compensations, input/output/errors, pending timers, signals, its trace), and the
operator actions behind a confirmation. ``source`` is what it reads through, ``actions`` what
it can do, ``app`` the server.
"""

from orchestrator.console.app import Console, ConsoleServer, make_server, serve

__all__ = ["Console", "ConsoleServer", "make_server", "serve"]
