"""``python -m lmnet`` (also the entry ``torchrun -m lmnet`` uses)."""
import sys

from lmnet.cli.main import main

sys.exit(main())
