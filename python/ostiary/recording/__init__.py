"""Session recordings: what each client sent and received (after masking), as recorded by the data
path's ``Recorder`` (``ostiary_wire::pg::recording``), stored in the data directory, listed and
replayed as psql showed it.

``format`` decodes the recorder's frames into events; ``store`` writes and reads recording files;
``render`` turns events back into psql's output.
"""

from __future__ import annotations

from ostiary.recording.format import Decoder, decode
from ostiary.recording.render import Renderer, replay
from ostiary.recording.store import (
    Recording,
    RecordingHeader,
    RecordingInfo,
    RecordingWriter,
    Trailer,
    find_recording,
    list_recordings,
    open_recording,
    recording_path,
)

__all__ = [
    "Decoder",
    "Recording",
    "RecordingHeader",
    "RecordingInfo",
    "RecordingWriter",
    "Renderer",
    "Trailer",
    "decode",
    "find_recording",
    "list_recordings",
    "open_recording",
    "recording_path",
    "replay",
]
