"""Recordings of live sessions: the gateway's side of ``ostiary.recording.store``.

The data path hands each recorded session's frames over in batches (``("recording", session,
frames)`` events: when half its buffer is full, at least once a second while active, and at its
end, before its ``ended`` event). ``LiveRecordings`` queues them in arrival order and one task
writes them (compressed blocks, in a worker thread), so the event loop never waits for a disk. The
queue is bounded in bytes: beyond ``MAX_QUEUED`` a session's frames are dropped and its recording is
marked incomplete (the audit trail's session_end record says so); the data path is never slowed by a
slow disk. With an ``Uploader`` (``audit.recordings.object_store``), each file is handed to it once
closed, and the session_end record names where it will be (``recording_url``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ostiary.recording.store import RecordingHeader, RecordingWriter, recording_path

if TYPE_CHECKING:
    from ostiary.hooks import SessionInfo
    from ostiary.recording.objectstore import Uploader

log = logging.getLogger("ostiary.recording")

MAX_QUEUED = 64 * 1024 * 1024


class LiveRecordings:
    def __init__(self, data_dir: str | Path, uploader: Uploader | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.uploader = uploader
        self.writers: dict[int, RecordingWriter] = {}
        self.dropped: dict[int, int] = {}
        self._queue: deque[tuple[int, bytes | None, str]] = deque()
        self._queued = 0
        self._wake = trio.Event()

    def start(self, info: SessionInfo, session_ref: str) -> str:
        """Opens the session's recording; returns its path relative to the data directory ("" if it
        could not be created: the session goes on, its session_start record says so)."""
        started = dt.datetime.fromtimestamp(info.started, dt.UTC)
        path = recording_path(self.data_dir, session_ref, started)
        header = RecordingHeader(
            session_ref=session_ref,
            started=started,
            identity=info.identity.name,
            connection=info.connection,
            grant=info.grant,
            peer=info.peer,
        )
        try:
            self.writers[info.id] = RecordingWriter(path, header)
        except OSError as e:
            log.error("session %d: cannot create its recording %s: %s", info.id, path, e)
            return ""
        return str(path.relative_to(self.data_dir))

    def frames(self, session: int, data: bytes) -> None:
        if session not in self.writers:
            return
        if self._queued + len(data) > MAX_QUEUED:
            self.dropped[session] = self.dropped.get(session, 0) + len(data)
            return
        self._queue.append((session, data, ""))
        self._queued += len(data)
        self._wake.set()

    def end(self, session: int, reason: str) -> dict[str, object]:
        """Queues the end of a session's recording; returns what its session_end record notes."""
        writer = self.writers.get(session)
        if writer is None:
            return {}
        self._queue.append((session, None, reason))
        self._wake.set()
        extra: dict[str, object] = {}
        if self.uploader is not None:
            extra["recording_url"] = self.uploader.url_for(writer.path)
        lost = self.dropped.pop(session, 0)
        if lost:
            extra["recording_incomplete_bytes"] = lost
        return extra

    def _write_one(self, session: int, data: bytes | None, reason: str) -> Path | None:
        """Writes one queued item; returns the file's path when this closed it."""
        writer = self.writers.get(session)
        if writer is None:
            return None
        try:
            if data is None:
                del self.writers[session]
                writer.close(reason)
                return writer.path
            writer.append(data)
        except (OSError, ValueError) as e:
            log.error("session %d: recording write failed: %s", session, e)
        return None

    async def _write(self, session: int, data: bytes | None, reason: str) -> None:
        closed = await trio.to_thread.run_sync(self._write_one, session, data, reason)
        if closed is not None and self.uploader is not None:
            self.uploader.closed(closed)

    async def drain(self) -> None:
        while self._queue:
            session, data, reason = self._queue.popleft()
            if data is not None:
                self._queued -= len(data)
            await self._write(session, data, reason)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self.drain()

    async def close(self) -> None:
        await self.drain()
        for session in list(self.writers):
            await self._write(session, None, "gateway stopped")
