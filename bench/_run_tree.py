"""Run the patchctl CLI of another source tree (an older commit), for a benchmark's "before" column.

    git archive COMMIT patchctl setup.py | tar -x -C /tmp/old && (cd /tmp/old && python setup.py build_ext --inplace)
    python bench/floor.py --patchctl "$PWD/.venv/bin/python $PWD/bench/_run_tree.py /tmp/old"

The editable install's import hook would load this checkout's ``patchctl``
whatever ``PYTHONPATH`` says; it is dropped, and the tree goes first on ``sys.path``.
"""

import sys

tree = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, tree)
for name in [k for k in sys.modules if k == "patchctl" or k.startswith("patchctl.")]:
    del sys.modules[name]

import patchctl  # noqa: E402
from patchctl.cli.main import main  # noqa: E402

if not patchctl.__file__.startswith(tree):
    sys.exit(f"_run_tree: imported {patchctl.__file__}, not the tree {tree}")
sys.exit(main(sys.argv[2:]))
