"""Does this Python hang a forked child while other threads enter Python? (CPython gh-112275,
fixed in 3.12, 3.11.10 and 3.10.15.) Two threads keep starting native threads that call into
Python, which creates a thread state each time, while the main thread forks for SECONDS; a child
that has not exited after 3 s counts as hung. Not collected by pytest.

  python tests/fork_race.py 60
"""

import ctypes
import os
import sys
import threading
import time

libc = ctypes.CDLL(None)
CALLBACK = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
enter_python = CALLBACK(lambda arg: None)  # from a native thread: a new Python thread state
running = True


def spawn_native_threads():
    tid = ctypes.c_ulong()
    while running:
        libc.pthread_create(ctypes.byref(tid), None, enter_python, None)
        libc.pthread_join(tid, None)


def fork_once():
    """True where the child did not exit within 3 s (it is killed)."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    for _ in range(300):
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return True


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60
    for _ in range(2):
        threading.Thread(target=spawn_native_threads, daemon=True).start()
    forks = hung = 0
    deadline = time.time() + seconds
    while time.time() < deadline:
        forks += 1
        hung += fork_once()
    print(f"Python {sys.version.split()[0]}: {forks} forks, {hung} children hung")


if __name__ == "__main__":
    main()
