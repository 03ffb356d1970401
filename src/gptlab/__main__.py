"""`python -m gptlab` (and `torchrun -m gptlab`) runs the CLI."""

from gptlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
