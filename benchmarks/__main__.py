"""``python -m benchmarks [--quick]`` from the repository root."""
from .suite import main

raise SystemExit(main())
