"""``python -m trainer ...`` == the ``tailrec`` console script (the Docker/TorchX entrypoint)."""
import sys

from trainer.cli import main

sys.exit(main())
