"""The daemon inside every sandbox: commands, sessions, files and metrics on port 44772."""
