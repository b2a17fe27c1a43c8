#!/usr/bin/env python
"""Step 7: talk to the classifier, or classify a file.

Interactive: type a message, get the verdict and P(spam) (an empty line or Ctrl-D quits).
Batch: --input F.jsonl|.csv|.txt --output G.jsonl writes one line per message with `text`,
`label` (spam/ham) and `p_spam`, in the input's order. The file is streamed in chunks (any size,
bounded memory); an interrupted run resumes where it stopped when started again.
"""

from smslora import cli
from smslora.commands.chat import main

if __name__ == "__main__":
    cli.run(main)
