"""``python -m serrinj.testvm``: run the built-in test VM (see serrinj.testvm.vmm)."""

from __future__ import annotations

import sys

from serrinj.testvm.vmm import main

sys.exit(main())
