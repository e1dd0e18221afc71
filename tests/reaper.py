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

ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
code = subprocess.call([sys.executable, "-m", "pytest", *sys.argv[1:]])
time.sleep(0.5)  # processes that exit on their own once pytest is gone get the time to
orphans = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, parent = f.read().rsplit(")", 1)[1].split()[:2]
        parent = int(parent)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        continue
    if parent != os.getpid():
        continue
    if state == "Z":  # it exited on its own after pytest did; collect it
        os.waitpid(int(pid), 0)
    else:
        orphans.append(f"{pid} ({cmdline})")
        os.kill(int(pid), signal.SIGKILL)
print("ORPHANS:", "; ".join(orphans) or "none")
sys.exit(code)
