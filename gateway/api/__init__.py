"""The front doors: one module per inbound API; routes.py wires them all, connections.py guards the socket."""
