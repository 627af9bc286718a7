"""Stand-ins for ``gcloud``, ``bq`` and ``kubectl`` that record each call instead of touching a
cloud, so the deploy scripts can be run end to end in tests. They answer as the real tools would
where the scripts depend on it: the project number, ``describe`` of what an earlier call created,
and "already exists" for a create that was made before."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

PROJECT_NUMBER = "123456789"


def recorded(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def main() -> int:
    log = Path(os.environ["CLOUD_CLI_LOG"])
    argv = sys.argv[1:]  # the tool's name, then its arguments
    seen = [call["argv"] for call in recorded(log)]
    call: dict[str, Any] = {"argv": argv}
    for arg in argv:
        if arg.startswith("user-data="):  # the script deletes its rendered file on exit
            call["user_data"] = Path(arg.split("=", 1)[1]).read_text()
    if argv[0] == "kubectl":
        call["stdin"] = sys.stdin.read()
    with log.open("a") as out:
        out.write(json.dumps(call) + "\n")
    if argv[1:3] == ["projects", "describe"]:
        print(PROJECT_NUMBER)
    elif "describe" in argv:
        at = argv.index("describe")
        made = [s for s in seen if s[:at] == argv[:at] and s[at : at + 2] == ["create", argv[at + 1]]]
        return 0 if made else 1
    elif "create" in argv and argv in seen:
        print(f"ERROR: ({argv[0]}) {argv[argv.index('create') + 1]} already exists", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
