"""Globs over names and over local directory trees, the same for local files and ``gs://`` objects.

A pattern matches segment by segment: ``*``, ``?`` and ``[...]`` stay within one, ``**`` stands
for any number of them, none included. Local patterns with ``**`` are matched against
``files_under`` their literal prefix: Python's ``glob`` follows every link to a directory, and a
link back up (``2024-07-01/up -> ..``) beside another way down (``latest -> 2024-07-01``) made
its paths double at each level, for ever.
"""

from __future__ import annotations

import fnmatch
import functools
import heapq
import os
import re


def matches(pattern: str, name: str) -> bool:
    """Whether ``name`` (an object's, or a path) matches a glob, segment by segment.

    Each (pattern part, name segment) pair is decided once: tried afresh for every way of
    splitting the name between them, a pattern of seven ``**`` took 50 s for one 40-segment name,
    on the event loop. Now it is at most parts x segments x segments steps."""
    parts, segments = pattern.split("/"), name.split("/")

    @functools.cache
    def match(part: int, segment: int) -> bool:
        if part == len(parts):
            return segment == len(segments)
        if parts[part] == "**":
            return any(match(part + 1, start) for start in range(segment, len(segments) + 1))
        return (segment < len(segments) and fnmatch.fnmatchcase(segments[segment], parts[part])
                and match(part + 1, segment + 1))  # fmt: skip

    return match(0, 0)


def literal_prefix(name: str) -> str:
    """The part of a glob before its first wildcard: every match starts with it."""
    return re.split(r"[*?[]", name, maxsplit=1)[0]


def files_under(top: str) -> list[str]:
    """Every regular file under the directory ``top`` (``""``: the current one, and names relative
    to it) but hidden ones (as ``glob`` leaves them out), each directory listed once however many
    links lead to it: first through directories alone, then through links to directories, in order
    of name. A file reached without a link is named without one, and a loop of links ends where it
    began."""
    found: list[str] = []
    listed: set[tuple[int, int]] = set()
    waiting: list[str] = [top]  # directories to list, depth first
    links: list[str] = []  # links to directories, a heap: listed by name once no directory waits
    while waiting or links:
        directory = waiting.pop() if waiting else heapq.heappop(links)
        try:
            seen = os.stat(directory or os.curdir)
            if (seen.st_dev, seen.st_ino) in listed:
                continue
            listed.add((seen.st_dev, seen.st_ino))
            with os.scandir(directory or os.curdir) as scan:
                entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name, reverse=True)
        except OSError:  # gone, or not readable: as glob, nothing under it
            continue
        for entry in entries:  # last name first: the first is on top of ``waiting``
            path = os.path.join(directory, entry.name)
            if entry.is_dir(follow_symlinks=False):
                waiting.append(path)
            elif entry.is_symlink() and entry.is_dir():
                heapq.heappush(links, path)
            elif entry.is_file():
                found.append(path)
    return found
