"""What runs a server, in the command or embedded in a program: the lifecycle (start, serve,
drain, every shutdown deadline), its listening sockets, TLS contexts, the memory budget's
default, the /metrics page, and the embedding API. Nothing here imports the process part
(wsechod.process): that is what makes the server embeddable."""
