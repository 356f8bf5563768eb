"""What the harnesses share: the atheris entry point with this project's defaults.

Each harness is a plain ``test_one_input(data: bytes)`` that raises on a broken invariant, so the
same function also runs under pytest or by hand on a crash file (``python fuzz/fuzz_X.py FILE``
reproduces it, as libFuzzer does).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))


def main(test_one_input: Callable[[bytes], None], name: str) -> None:
    import atheris

    argv = list(sys.argv)
    if not any(a.startswith("-timeout=") for a in argv):
        argv.append("-timeout=20")      # a hang is a finding, not a stuck campaign
    if not any(a.startswith("-rss_limit_mb=") for a in argv):
        argv.append("-rss_limit_mb=4096")
    dictionary = os.path.join(HERE, f"{name}.dict")
    if os.path.exists(dictionary) and not any(a.startswith("-dict=") for a in argv):
        argv.append(f"-dict={dictionary}")
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
