"""``python -m mcm.cli ...`` = ``mcm ...`` (DDP workers and tests start it this way)."""
from mcm.cli import main

main()
