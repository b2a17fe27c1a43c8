#!/usr/bin/env python
"""Steps 1-6 and the report, in order, in one Python process: what `./runme.sh` runs.

    python scripts/pipeline.py [--config NAME] [--resume] [--base NAME]
"""

from smslora import cli
from smslora.commands.pipeline import main

if __name__ == "__main__":
    cli.run(main)
