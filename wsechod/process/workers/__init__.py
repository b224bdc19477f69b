"""Several workers (``workers = N``): the main process forks them, keeps them running, and
speaks for them; they share a scoreboard (one block of memory) for the whole daemon's
figures and health. The rooms: ``supervisor`` (the main process's loop), ``signals`` (its
wait), ``restarts`` (the backoff), ``child`` (a worker after the fork), ``scoreboard`` (the
shared block), ``worker`` and ``totals`` (each side of it), ``steering`` (new connections to
live workers only)."""
