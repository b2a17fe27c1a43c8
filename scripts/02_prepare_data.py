#!/usr/bin/env python
"""Step 2: the SMS Spam Collection -> data/{train,valid,test}.jsonl.

Deduplicate first (the raw corpus repeats ~400 messages, so a naive split leaks test messages
into training), then hold out a stratified test split at the natural ham/spam ratio, and draw the
tutorial's balanced train/valid sets from what is left. Same seed, same split, every time.
"""

from smslora import cli
from smslora.commands.prepare import main

if __name__ == "__main__":
    cli.run(main)
