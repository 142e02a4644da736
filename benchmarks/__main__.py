"""``python -m benchmarks``: the full cancelflow benchmark suite (``cancelflow bench``).

Writes ``bench-results.json`` and ``bench-results.png`` in the current directory unless
``--json`` / ``--plot`` say otherwise; every other option is ``cancelflow bench``'s
(``--quick``, ``--samples N``, ``--scenarios ...``, ``--systems ...``, ``--seed``).
"""

from __future__ import annotations

import sys

from cancelflow._bench import main_full

if __name__ == "__main__":
    sys.exit(main_full())
