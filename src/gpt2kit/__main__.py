"""`python -m gpt2kit ...` (and so `torchrun -m gpt2kit train ...`) runs the gpt2kit command."""
import sys

from .cli import main

sys.exit(main())
