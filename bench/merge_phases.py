"""Wall-clock phases of one ``patchctl`` merge, and its CPU seconds (issue #21's profile).

    cp -r bench/_work/floor-llama-l24/pushed /tmp/phases-reg   # a copy of bench/floor.py's three pushed fine-tunes
    python bench/merge_phases.py merge ft-dense:v1 ft-sparse:v1 ft-lowrank:v1 --weights 0.5,0.3,0.2 \\
        --as m:v1 --no-validate --apply /tmp/phases-out --base bench/_work/llama-l24-base --registry /tmp/phases-reg

Prints, on stderr, when each phase of ``registry.ops.merging.run.merge`` starts
and ends (torch's import where the merge needs torch, the plan, LiNeS's α
pass, the streaming pass: ``_stream`` on torch or ``stream`` on the C
kernels, the wait for the input verifier) in seconds since start, then this process's CPU
seconds (the verifier's helper process not included).
"""

import resource
import sys
import time

T0 = time.perf_counter()
marks: list[tuple[float, str]] = []


def timed(mod, name: str) -> None:
    f = getattr(mod, name)

    def wrap(*a, **k):
        marks.append((time.perf_counter() - T0, "start " + name))
        try:
            return f(*a, **k)
        finally:
            marks.append((time.perf_counter() - T0, "end " + name))

    setattr(mod, name, wrap)


import patchctl.registry.ops.merging.run as run  # noqa: E402
from patchctl.registry.ops.merging import host_stream, verify  # noqa: E402

for fn in ("_import_torch", "plan", "_stream", "_lines_alpha"):
    timed(run, fn)
timed(host_stream, "stream")  # the streaming pass of a merge on the C kernels (no torch import at all)
timed(verify._Verifier, "wait")

from patchctl.cli.main import main  # noqa: E402

rc = main(sys.argv[1:])
marks.append((time.perf_counter() - T0, "end"))
ru = resource.getrusage(resource.RUSAGE_SELF)
for t, what in marks:
    print(f"{t:7.2f} s  {what}", file=sys.stderr)
print(f"CPU: user {ru.ru_utime:.2f} s, system {ru.ru_stime:.2f} s", file=sys.stderr)
sys.exit(rc)
