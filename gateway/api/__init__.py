"""The front doors: one module per inbound API; `add_routes` wires them all."""

from gateway.api.routes import add_routes

__all__ = ["add_routes"]
