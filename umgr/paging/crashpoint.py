"""Named places where a test can have the daemon die (SIGKILL, as an OOM
kill or a bug would), to prove that a restarted daemon recovers from
exactly there. UMGR_TEST_CRASH_AT names one; it is read once, at import,
so a daemon restarted without it runs on."""
import os
import signal

CRASH_AT = os.environ.get("UMGR_TEST_CRASH_AT", "")


def crash_point(name: str) -> None:
    if CRASH_AT == name:
        os.kill(os.getpid(), signal.SIGKILL)
