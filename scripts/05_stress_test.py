#!/usr/bin/env python
"""Step 5: the stress test -> reports/stress_<name>.json.

The 10 fixed messages plus the stress suite in data/stress_suite.jsonl (the tutorial's two
adversarial messages, its five "final boss" messages and modern smishing / hard ham written for
this project). Every miss is listed.
"""

from smslora import cli
from smslora.commands.stress import main

if __name__ == "__main__":
    cli.run(main)
