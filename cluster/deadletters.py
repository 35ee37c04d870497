"""List dead letters, and replay chosen ones through the pipeline after a fix.

    python -m cluster.deadletters list [--reason TEXT] [--limit N] [--all]
    python -m cluster.deadletters replay [--reason TEXT] [--limit N]

`replay` sends each chosen dead letter's payload, unchanged, to the main topic
(settings.kafka_topic): the exact bytes received (`payload_raw`) when the text
shown is an escaped rendering of them (a NUL, invalid UTF-8), the text
otherwise. It waits until the broker has them, and only then marks them
replayed; a letter already replayed is never sent again. A replayed message is
validated again like any other: if it is still poison it becomes a new dead
letter at its new position.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import unicodedata
from typing import Any

from configs.settings import Settings, get_settings

log = logging.getLogger(__name__)


def list_dead_letters(settings: Settings, reason: str | None = None, limit: int = 50,
                      include_replayed: bool = False) -> tuple[list[dict[str, Any]], int]:
    from cluster.store.audit import AuditRepository
    from cluster.store.db import get_engine

    return AuditRepository(get_engine(settings)).dead_letters(
        limit=limit, reason=reason, include_replayed=include_replayed)


def replay(settings: Settings, reason: str | None = None, limit: int = 100, topic: str | None = None) -> int:
    """Send chosen, not yet replayed dead letters back to the main topic; return how many.

    `reason` matches part of the reason; `topic` keeps the letters that came from it.
    """
    from cluster.dev.records import kafka_bootstrap
    from cluster.producer import KafkaSender
    from cluster.store.audit import AuditRepository
    from cluster.store.db import get_engine

    repo = AuditRepository(get_engine(settings))
    letters = _choose(repo, reason, limit, topic)
    if not letters:
        return 0
    sender = KafkaSender(kafka_bootstrap(settings))
    try:
        for letter in letters:
            value = original_payload(letter)
            sender.send(settings.kafka_topic, _key(value), value)
        sender.flush()  # raises if any was not delivered: nothing is marked replayed then
    finally:
        sender.close()
    repo.mark_replayed([letter["id"] for letter in letters])
    return len(letters)


def original_payload(letter: dict[str, Any]) -> bytes:
    """The bytes the dead letter arrived as: `payload_raw` when kept, else its text."""
    raw = letter.get("payload_raw")
    return bytes(raw) if raw is not None else letter["payload"].encode("utf-8")


def _choose(repo, reason: str | None, limit: int, topic: str | None) -> list[dict[str, Any]]:
    if topic is None:
        return repo.dead_letters(limit=limit, reason=reason, include_replayed=False, include_raw=True)[0]
    chosen: list[dict[str, Any]] = []
    offset, page = 0, 1_000
    while len(chosen) < limit:
        rows, total = repo.dead_letters(limit=page, offset=offset, reason=reason, include_replayed=False,
                                        include_raw=True)
        chosen += [r for r in rows if (r["position"] or "").startswith(f"{topic}[")]
        offset += page
        if offset >= total:
            break
    return chosen[:limit]


def _key(payload: bytes | str) -> bytes | None:
    """The user_id of a payload, when it has one, so a replay lands on the user's partition."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deep
        return None
    user = data.get("user_id") if isinstance(data, dict) else None
    return str(user).encode("utf-8", errors="surrogatepass") if user is not None else None


def _printable(text: str) -> str:
    """Control characters shown as escapes: a hostile payload must not drive the terminal."""
    return "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" else c for c in text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.deadletters",
                                     description="List or replay dead letters.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("list", "show dead letters, newest first"),
                            ("replay", "send dead letters back to the main topic and mark them replayed")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--reason", default=None, help="only letters whose reason contains this text")
        p.add_argument("--limit", type=int, default=50 if name == "list" else 100)
        p.add_argument("--topic", default=None, help="only letters that came from this topic")
        if name == "list":
            p.add_argument("--all", action="store_true", help="include replayed letters")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if args.limit < 1:
        print("--limit must be positive", file=sys.stderr)
        return 2
    if args.command == "list":
        rows, total = list_dead_letters(settings, args.reason, args.limit, include_replayed=args.all)
        if args.topic:
            rows = [r for r in rows if (r["position"] or "").startswith(f"{args.topic}[")]
        for r in rows:
            replayed = f" replayed {r['replayed_at']:%Y-%m-%d %H:%M}" if r["replayed_at"] else ""
            payload = r["payload"] if len(r["payload"]) <= 120 else r["payload"][:117] + "..."
            escaped = " (escaped; the exact bytes are kept for replay)" if r.get("payload_escaped") else ""
            print(f"#{r['id']} {r['created_at']:%Y-%m-%d %H:%M:%S} {_printable(r['position'] or '-')} "
                  f"[{_printable(r['source'])}]{replayed}\n    reason: {_printable(r['reason'])}\n"
                  f"    payload{escaped}: {_printable(payload)}")
        print(f"{len(rows)} shown of {total}")
    else:
        n = replay(settings, args.reason, args.limit, args.topic)
        print(f"replayed {n} dead letter(s) to {settings.kafka_topic}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
