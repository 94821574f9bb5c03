"""`python -m sparsepd`: the `sparsepd` command. This file is the deploy layer's entry point, not part of the
floor it sits in (tests/sparsepd/test_layout.py counts it with deploy/)."""

import sys

from sparsepd.deploy.cli import main

sys.exit(main())
