"""The core of the small daemons: execd, the task executor and the local runtime's jail init.

- `process`: run until SIGTERM/SIGINT, exit 1 when the daemon cannot start;
- `http`: a small HTTP/1.1 server with a router (every daemon serves its API with it);
- `errors`: the one `ApiError` (a `{code, message}` answer) and the codes clients switch on;
- `times`: RFC 3339 timestamps, as every program writes and reads them;
- `logs`: one logging setup (logfmt or JSON lines with each call's fields).

Standard library only: execd and the task executor are PyInstaller bundles that must start fast
and stay small. The server and the controller use `times` and `logs` too.
"""
