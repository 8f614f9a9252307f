"""`python -m detr_edge ...` is the `detr-edge` command (also under torchrun)."""
import sys

from .cli import main

sys.exit(main())
