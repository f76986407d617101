"""``python -m jax_moe_dispatch.bench``."""

import sys

from jax_moe_dispatch.bench.cli import main

sys.exit(main())
