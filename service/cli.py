"""The ``scorerecon`` console script: the core's commands plus ``serve`` and ``keys``."""

from __future__ import annotations

import argparse
import json
import sys

from models.cli import main as core_main


def _log_to_stderr() -> None:
    """Job ids, states and retries from our modules, with the process id (which worker)."""
    import logging

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    _log_to_stderr()
    settings = Settings()
    print(f"scorerecon gateway on http://{args.host}:{args.port} (data in {settings.home})")
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level="info",
        proxy_headers=True,  # the scheme and client of X-Forwarded-*, from trusted proxies
        forwarded_allow_ips=settings.forwarded_allow_ips,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from service.settings import Settings
    from workers.celery_app import make_celery

    _log_to_stderr()
    app = make_celery(Settings())
    argv = ["worker", "-Q", args.queues, "--concurrency", str(args.concurrency), "-l", "info"]
    if args.beat:
        argv.append("--beat")  # also run the periodic recovery sweep (one per deployment)
    app.worker_main(argv)
    return 0


def _store():
    from service.db import JobStore
    from service.migrate import upgrade
    from service.settings import Settings

    settings = Settings().prepare()
    upgrade(settings.db_url)
    return JobStore(settings.db_url)


def cmd_keys(args: argparse.Namespace) -> int:
    from service.auth import create_key, list_keys, revoke_key

    store = _store()
    if args.keys_cmd == "create":
        key_id, key = create_key(store, args.scopes.split(","), args.owner)
        store.audit("create-key", key_id, owner="cli")
        print(json.dumps({"id": key_id, "key": key, "note": "shown once; store it now"}))
    elif args.keys_cmd == "list":
        print(json.dumps(list_keys(store), indent=2))
    elif args.keys_cmd == "revoke":
        if not revoke_key(store, args.id):
            print(f"error: no active key {args.id}", file=sys.stderr)
            return 2
        store.audit("revoke-key", args.id, owner="cli")
        print(json.dumps({"id": args.id, "revoked": True}))
    else:
        print("usage: scorerecon keys create|list|revoke", file=sys.stderr)
        return 2
    return 0


def add_commands(sub) -> None:
    from service.settings import settings_help

    s = sub.add_parser(
        "serve",
        help="run the HTTP gateway",
        description="Run the HTTP gateway (FastAPI on uvicorn). Configured by SCORERECON_* "
        "environment variables, the same for the gateway and its workers.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.set_defaults(func=cmd_serve)
    w = sub.add_parser("worker", help="run a Celery worker (deployment)")
    w.add_argument("--queues", default="gpu,cpu")
    w.add_argument("--concurrency", type=int, default=1, help="one per GPU")
    w.add_argument("--beat", action="store_true", help="also schedule the recovery sweep")
    w.set_defaults(func=cmd_worker)
    k = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_cmd")
    c = k.add_parser("create", help="create a key (printed once)")
    c.add_argument("--scopes", default="recon:submit,recon:read")
    c.add_argument("--owner", default="default")
    k.add_parser("list", help="list keys (never the keys themselves)")
    r = k.add_parser("revoke", help="revoke a key by id")
    r.add_argument("id")
    for p in (c, r, k._name_parser_map["list"]):
        p.set_defaults(func=cmd_keys)


def main(argv: list[str] | None = None) -> int:
    return core_main(argv, extensions=(add_commands,))


if __name__ == "__main__":
    sys.exit(main())
