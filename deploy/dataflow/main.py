"""The Flex Template's entry point: template parameters become config/batch.yaml's variables,
every other flag goes to Beam, and the job runs as ``clickflow run --runner dataflow`` does.

The launcher calls this file with the parameters and the job's options as ``--name=value`` flags,
``--template_location`` among them (Beam then writes the job there and Dataflow starts it) and
``--runner=DataflowRunner``, which ``--runner dataflow`` replaces.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import MutableMapping

PIPELINE = "/etc/clickflow/batch.yaml"
VARIABLES = {"input": "CLICKFLOW_INPUT", "output_project": "PROJECT_ID", "dataset": "DATASET"}


def command(argv: list[str], environ: MutableMapping[str, str]) -> list[str]:
    """``clickflow run`` arguments for these template arguments; sets the variables in ``environ``."""
    parser = argparse.ArgumentParser()
    for name in VARIABLES:
        parser.add_argument(f"--{name}", required=name != "dataset")
    parser.add_argument("--runner")
    known, beam_flags = parser.parse_known_args(argv)
    for name, variable in VARIABLES.items():
        if getattr(known, name) is not None:
            environ[variable] = getattr(known, name)
    return ["run", PIPELINE, "--runner", "dataflow", *beam_flags]


if __name__ == "__main__":
    from clickflow.cli import main

    sys.argv = ["clickflow", *command(sys.argv[1:], os.environ)]
    main()
