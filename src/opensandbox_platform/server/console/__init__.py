"""The web console: a browser view of every sandbox with a terminal (routes.py, static/)."""
