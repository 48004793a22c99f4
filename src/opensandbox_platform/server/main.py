"""`opensandbox-server`: runs the control plane with uvicorn; `init-config` writes a config file;
`commit-snapshot` is the kubernetes runtime's committer pod (runtimes/kubernetes_committer.py)."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from pathlib import Path

import uvicorn

from opensandbox_platform.daemon import logs
from opensandbox_platform.server import config as configuration
from opensandbox_platform.server.app import create_app, default_runtime
from opensandbox_platform.server.listener import limits_of, protocol_class


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="opensandbox-server",
        description="The OpenSandbox control plane: the REST API the opensandbox SDK talks to. "
        "Without a config file it runs the local runtime on 127.0.0.1:8080.",
    )
    parser.add_argument(
        "--config", help=f"TOML config file (default: ${configuration.CONFIG_ENV}, else built-in defaults)"
    )
    parser.add_argument("--host", help="address to listen on (overrides server.host; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (overrides server.port; default 8080)")
    commands = parser.add_subparsers(dest="command", metavar="{init-config,commit-snapshot}")
    init = commands.add_parser(
        "init-config", help="write a commented config file with every default, a new random API key and signing key"
    )
    init.add_argument("path", nargs="?", default=str(Path.home() / ".sandbox.toml"), help="default ~/.sandbox.toml")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    commands.add_parser(
        "commit-snapshot",
        help="(the kubernetes runtime's committer pod) snapshot a container on this node: the job is $OSB_COMMIT_JOB",
    )
    return parser.parse_args(argv)


def init_config(path: str, force: bool) -> int:
    target = Path(path).expanduser()
    if target.exists() and not force:
        print(f"{target} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        configuration.render_default(api_key=secrets.token_urlsafe(32), signing_secret=secrets.token_urlsafe(32))
    )
    target.chmod(0o600)  # it holds the API key
    print(
        f"wrote {target} (with a new random server.apiKey, which clients send as OPEN-SANDBOX-API-KEY,"
        " and server.signingKeys)"
    )
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "init-config":
        sys.exit(init_config(args.path, args.force))
    if args.command == "commit-snapshot":
        from opensandbox_platform.server.runtimes import kubernetes_committer  # only the committer pod needs it

        sys.exit(kubernetes_committer.main())
    try:
        config = configuration.load(args.config)
    except configuration.ConfigError as exc:
        print(f"opensandbox-server: {exc}", file=sys.stderr)
        sys.exit(2)
    if args.host:
        config.server.host = args.host
    if args.port:
        config.server.port = args.port
    level = config.server.log_level
    logs.setup(level)
    if not config.server.api_key and not configuration.is_loopback(config.server.host):
        logging.getLogger("opensandbox.server").warning(
            "listening on %s without an API key: anyone who can reach it can create, run code in and delete"
            " sandboxes; set server.apiKey (opensandbox-server init-config writes a random one)",
            config.server.host,
        )
    app = create_app(config, default_runtime(config, args.config))
    limits = limits_of(config.server)
    # log_config=None: uvicorn's own loggers go through the same logfmt handler as ours.
    uvicorn.run(
        app,
        host=config.server.host,
        port=config.server.port,
        log_level=level.lower(),
        log_config=None,
        http=protocol_class(limits),
        timeout_keep_alive=limits.keep_alive_timeout,  # type: ignore[arg-type]  # uvicorn takes a float too
        backlog=4096,
    )


if __name__ == "__main__":
    main()
