"""Run pytest as a child, adopting every process it leaves behind, and report them.

Usage: python reaper.py PYTEST_ARGS...  Prints "ORPHANS: none" or the leftovers,
kills them, and exits with pytest's exit code. Linux only (a child subreaper).
"""

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36


def adopted() -> dict[int, tuple[str, str]]:
    """Processes this reaper adopted: pid -> (state, command line)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, parent = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if int(parent) == os.getpid():
            found[int(pid)] = (state, cmdline)
    return found


ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
code = subprocess.call([sys.executable, "-m", "pytest", *sys.argv[1:]])


# Processes that exit on their own once pytest is gone (handlers notice their parent
# died) get up to GRACE seconds, collected as they exit, rather than a fixed pause.
GRACE = 5.0  # ten times what they need; more would hide processes that linger
deadline = time.monotonic() + GRACE
while True:
    living = {}
    for pid, (state, cmdline) in adopted().items():
        if state == "Z":
            os.waitpid(pid, 0)
        else:
            living[pid] = cmdline
    if not living or time.monotonic() >= deadline:
        break
    time.sleep(0.05)
orphans = []
for pid, cmdline in living.items():
    orphans.append(f"{pid} ({cmdline})")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
print("ORPHANS:", "; ".join(orphans) or "none")
sys.exit(code)
