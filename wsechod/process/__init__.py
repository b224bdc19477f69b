"""Process concerns, kept apart from the server so that it can be embedded: the command
line, daemon mode, the pidfile, privileges, systemd, logs. Nothing below ``lifecycle``
imports from here."""
