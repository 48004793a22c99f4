"""The FastAPI control plane the official SDK talks to, and its runtimes (local, docker, kubernetes)."""
