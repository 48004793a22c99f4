"""Isolated sessions (OSEP-0013): a bubblewrap namespace inside the sandbox whose writes land in
copy-on-write overlays, with a diff and a commit of what changed. See docs/isolated-sessions.md."""
