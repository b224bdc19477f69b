"""Applications: what a connection's messages mean. They see only the engine's connection
interface (send, close, pause, counts), never frames, HTTP or websockets."""
