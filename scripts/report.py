#!/usr/bin/env python
"""The before/after report: reports/report.md and report.json, from what steps 03-06 wrote.

Reads only the JSON files in reports/ (no model is loaded), so it can be re-run at any time.
"""

from smslora import cli
from smslora.commands.report import main

if __name__ == "__main__":
    cli.run(main)
