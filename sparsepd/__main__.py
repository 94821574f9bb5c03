import sys

from sparsepd.cli import main

sys.exit(main())
