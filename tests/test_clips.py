"""Clips: injective file names, and retention that deletes only the clips it wrote."""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from mqtt_helpers import wait_for
from streamer.capture.ring import RingBuffer
from streamer.events import Event
from streamer.sinks.clips import ClipSettings, ClipWriter, clip_name, is_clip_name

DAY_S = 86400.0


def event(stream: str, target: str, start: int) -> Event:
    return Event(id=f"{stream}:{target}:{start}", stream=stream, target=target, state="OFF", labels=(target,),
                 start_sample=start, end_sample=start + 8000, start_time=1.7e9, end_time=1.7e9 + 0.5, peak=0.9,
                 mean=0.8, closed_by="audio")


def test_clip_names_are_injective_and_recognisable():
    names = ["a/b", "a b", "+", "#", "🔥", "厨房", "Kitchen", "kitchen"]
    files = {clip_name(s, t, 16000, 1.7e9) for s in names for t in names}
    assert len(files) == len(names) ** 2  # 8 sources × 8 targets: 64 distinct files
    assert all(is_clip_name(f) and "/" not in f for f in files)
    for user_file in ("kitchen-dog-16000.flac", "holiday.flac", "streamer-notes.txt", "streamer-a-b.flac",
                      "my streamer-kitchen-dog-20240101T000000Z-1.flac"):
        assert not is_clip_name(user_file)


def test_retention_deletes_only_its_own_old_clips_and_says_so(tmp_path, caplog):
    directory = tmp_path / "clips"
    directory.mkdir()
    old = time.time() - 40 * DAY_S
    user_files = [directory / n for n in ("holiday.flac", "kitchen-dog-16000.flac", "notes.txt", "streamer-readme.flac")]
    (directory / "sub").mkdir()
    user_files.append(directory / "sub" / clip_name("Kitchen", "Dog", 1, 1.0))  # not directly in the folder
    for p in user_files:
        p.write_bytes(b"the user's own data")
        os.utime(p, (old, old))
    ours_old = [directory / clip_name("Kitchen", "Dog", n, old) for n in range(3)]
    for p in ours_old:
        p.write_bytes(b"an old clip")
        os.utime(p, (old, old))
    writer = ClipWriter(ClipSettings(directory=directory, pre=0.5, post=0.5, max_age_s=30 * DAY_S))
    ring = RingBuffer(16000 * 10)
    ring.write(np.zeros(16000 * 5, dtype=np.float32))
    try:
        with caplog.at_level(logging.INFO, logger="streamer.sinks.clips"):
            path = writer.save(event("Kitchen", "Dog", 16000), ring)
            assert path is not None and is_clip_name(path.name)
            assert wait_for(lambda: writer.written == 1 and writer.deleted == 3, 10)
    finally:
        writer.close()
    assert path.exists()
    assert all(p.exists() for p in user_files)  # nothing of the user's is touched, however old
    assert not any(p.exists() for p in ours_old)
    assert "retention deleted 3 clip(s)" in caplog.text


def test_retention_by_size_keeps_the_newest_of_its_own(tmp_path):
    directory = tmp_path / "clips"
    directory.mkdir()
    big_user_file = directory / "recording.wav"
    big_user_file.write_bytes(b"x" * 300_000)  # does not count against our budget, and stays
    now = time.time()
    ours = []
    for n in range(4):
        p = directory / clip_name("Kitchen", "Dog", n, now)
        p.write_bytes(b"y" * 100_000)
        os.utime(p, (now - 100 + n, now - 100 + n))
        ours.append(p)
    writer = ClipWriter(ClipSettings(directory=directory, max_bytes=250_000))
    try:
        assert writer._retain() == 2
    finally:
        writer.close()
    assert [p.exists() for p in ours] == [False, False, True, True] and big_user_file.exists()


def test_no_clip_path_is_given_when_the_disk_cannot_hold_the_clip(tmp_path, monkeypatch):
    """The event goes out with its clip's path before the file is written: on a full disk every OFF
    named a clip that never came. Now the path is None, and the error is counted."""
    import shutil

    import streamer.sinks.clips as clips

    ring = RingBuffer(16000 * 10)
    ring.write(np.full(16000 * 5, 0.1, dtype=np.float32))
    writer = ClipWriter(ClipSettings(directory=tmp_path / "clips", pre=0.5, post=0.5))
    try:
        real = shutil.disk_usage
        monkeypatch.setattr(clips.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
        assert writer.save(event("kitchen", "dog", 16000), ring) is None and writer.errors == 1
        monkeypatch.setattr(clips.shutil, "disk_usage", real)
        path = writer.save(event("kitchen", "dog", 32000), ring)
        assert path is not None and wait_for(lambda: path.is_file(), 10) and writer.errors == 1
    finally:
        writer.close()
