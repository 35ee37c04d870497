"""`python -m cluster.dev up | down | status`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from cluster.dev.records import _redact
from cluster.dev.servers import ensure_servers, status, stop_servers
from configs.settings import SettingsError, get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.dev",
        description="Start, stop and report the embedded PostgreSQL and Kafka-protocol broker.",
    )
    parser.add_argument("command", choices=["up", "down", "status"],
                        help="up: start what is needed and migrate; down: stop what was started; "
                             "status: URLs, pids, data folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.command == "up":
        urls = ensure_servers(settings)
        print(json.dumps({k: _redact(v) for k, v in urls.items()} | status(settings), indent=2))
    elif args.command == "down":
        stopped = stop_servers(settings)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        report = status(settings)
        from cluster.metrics import operational_summary

        try:
            report["operations"] = operational_summary(settings)
        except Exception as exc:  # servers down: say so, the rest of the report stands
            report["operations"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
