"""wsechod: a WebSocket echo and relay server daemon."""

__version__ = "0.1.0"
