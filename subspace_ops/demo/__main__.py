"""``python -m subspace_ops.demo``: see ``subspace_ops/demo/__init__.py`` and ``--help``."""
from .cli import main

if __name__ == "__main__":
    main()
