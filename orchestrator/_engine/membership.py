"""One process per node id: a node claims its id before it joins the group.

Two processes with the same ``SAGA_NODE_ID`` share a static group membership and a transactional
id, so the second would fence the first: the running node would stop (or, before, idle while
saying it was healthy). The claim refuses the second process instead, with one clear line:

1. A lock on ``<state_dir>/<namespace>/node.lock``: a second process on the same state dir is
   refused at once.
2. The consumer group is asked for a member with this node's ``group.instance.id``. Its client id
   is compared with those the previous incarnations wrote into the lock file: if it is one of
   them, the member is such an incarnation, dead (we hold its lock), and static membership hands
   its partitions over at once. Any other member with our id belongs to a process elsewhere: the
   claim waits one session timeout for it to expire (a crashed process on another machine) and
   refuses if it is still there (a live one).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from pathlib import Path
from typing import IO, Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from orchestrator.errors import NodeStopped

log = logging.getLogger(__name__)

_KEEP = 50  # client ids of earlier incarnations remembered in node.lock


class NodeClaim:
    def __init__(self, state_root: Path, group: str, instance_id: str) -> None:
        self.path = state_root / "node.lock"
        self.group = group
        self.instance_id = instance_id
        self.client_id = f"{instance_id}.{uuid.uuid4().hex[:8]}"
        self._file: IO[str] | None = None

    def acquire(self, admin_config: dict[str, Any], session_timeout_s: float) -> str:
        """Claim the node id; returns the client id this process must use. Raises
        :class:`NodeStopped` when another process holds it."""
        previous = self._lock()
        admin = AdminClient(admin_config)
        others = self._others(admin, previous)
        deadline = time.monotonic() + session_timeout_s + 3
        while others and time.monotonic() < deadline:
            log.info("node id %s is a member of %s as %s; waiting for it to expire",
                     self.instance_id, self.group, others)  # fmt: skip
            time.sleep(1.0)
            others = self._others(admin, previous)
        if others:
            self.release()
            raise NodeStopped(
                f"node id {self.instance_id.rsplit('.', 1)[-1]} is in use by a running process "
                f"({', '.join(others)}); give every node its own SAGA_NODE_ID"
            )
        return self.client_id

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None

    def _lock(self) -> set[str]:
        """Take the lock file; return the client ids earlier holders wrote into it (a holder
        killed before its join completed leaves the group showing an older one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the process's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise NodeStopped(
                f"another process runs a node on the state dir {self.path.parent} "
                "(its node.lock is held); give every node its own SAGA_NODE_ID and state dir"
            ) from None
        handle.seek(0)
        previous = handle.read().split()[-_KEEP:]
        handle.seek(0)
        handle.truncate()
        handle.write("\n".join([*previous, self.client_id]) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._file = handle
        return set(previous)

    def _others(self, admin: AdminClient, previous: set[str]) -> list[str]:
        """Members of the group with our instance id that are not our dead predecessors."""
        try:
            found = admin.describe_consumer_groups([self.group], request_timeout=10)
            description = found[self.group].result(15)
        except KafkaException as exc:
            # The check is a courtesy: fencing still protects the data. Do not refuse to start
            # because the group could not be described (e.g. it does not exist yet).
            log.debug("group %s not described: %s", self.group, exc)
            return []
        return [
            f"{m.client_id} on {m.host.lstrip('/')}"
            for m in description.members
            if m.group_instance_id == self.instance_id and m.client_id not in previous
        ]
