"""Init of a fresh pid namespace for restoring a bare tree while its frozen source still exists.

Theory of operation. A tree from the host's root pid namespace keeps its PIDs when CRIU restores
it; on the same machine those PIDs still belong to the frozen source. CRIU's ``criu-ns`` script
solves this by restoring inside a new pid namespace; this module does the same for the swrk RPC:

    phaul (swrk client) ── holder (this module, our child) ── init (pid 1 of a new pid ns)
                                                                ├── criu swrk FD
                                                                └── restored root (rst_sibling)

``python -m phaul.engine.nsinit --ctl CTL CRIU SWRK_FD``: the holder unshares CLONE_NEWPID and
CLONE_NEWNS and forks. The child is pid 1 of the new pid namespace: as criu-ns does, it makes
``/`` a recursive slave and mounts a fresh ``/proc`` (so CRIU sees the namespace's own PIDs),
calls setsid, starts ``criu swrk SWRK_FD`` as its child and reaps every child. CRIU restores
with ``rst_sibling``, so the restored root becomes the init's child.

The control socket CTL (SOCK_SEQPACKET, one text message per packet) to the swrk client:
  holder → client  ``init HOSTPID``   the init's PID in the client's pid namespace
  init   → client  ``ready CRIUPID``  criu was started (its PID inside the namespace)
  client → init    ``root PID``       the restored root (PID inside); the init joins its time
                                      namespace (CRIU gives the restored tree a new one) so that
                                      a later dump of the whole namespace sees one time namespace
  init   → client  ``ok`` | ``error TEXT``

The init exits (and with it every process of the namespace) when the restored root has exited
(with its exit status), when it has no children left, or when the control socket closes before
a root was announced. The holder exits with the init's status, so the client reaps the holder.
Stdlib only besides phaul.engine.nsutil: start-up must stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import signal
import socket
import sys

from phaul.engine import nsutil

_CTL_MAX = 4096


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _send(ctl: socket.socket | None, text: str) -> None:
    if ctl is None:
        return
    with contextlib.suppress(OSError):
        ctl.send(text.encode())


def _start_criu(criu: str, swrk_fd: int, ctl: socket.socket) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            ctl.close()
            os.set_inheritable(swrk_fd, True)
            os.execv(criu, [criu, "swrk", str(swrk_fd)])  # noqa: S606 - argument list, no shell
        finally:
            os._exit(127)
    return pid


def _run_init(criu: str, swrk_fd: int, ctl: socket.socket) -> int:
    """Body of pid 1 of the new namespace; returns its exit status."""
    os.setsid()
    nsutil.mount(None, "/", None, nsutil.MS_SLAVE | nsutil.MS_REC)
    nsutil.mount("proc", "/proc", "proc", nsutil.MS_NOSUID | nsutil.MS_NODEV | nsutil.MS_NOEXEC)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)

    criu_pid = _start_criu(criu, swrk_fd, ctl)
    os.close(swrk_fd)
    _send(ctl, f"ready {criu_pid}")
    live_ctl: socket.socket | None = ctl
    root: int | None = None
    criu_status = 1
    while True:
        # Reap everything that has exited.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                # No children left: criu is gone and there is no restored root (any more).
                return criu_status
            if pid == 0:
                break
            if pid == criu_pid:
                criu_status = _exit_code(status)
            elif pid == root:
                return _exit_code(status)
        rlist: list[int] = [wake_r] if live_ctl is None else [wake_r, live_ctl.fileno()]
        try:
            ready, _, _ = select.select(rlist, [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        if live_ctl is not None and live_ctl.fileno() in ready:
            try:
                msg = live_ctl.recv(_CTL_MAX).decode()
            except OSError:
                msg = ""
            if not msg:
                live_ctl.close()
                live_ctl = None
                if root is None:
                    # The client gave up before a restore succeeded: end the namespace.
                    return 1
                continue
            word, _, arg = msg.partition(" ")
            if word == "root":
                try:
                    root = int(arg)
                    nsutil.setns(f"/proc/{root}/ns/time", nsutil.CLONE_NEWTIME)
                except (OSError, ValueError) as err:
                    _send(live_ctl, f"error cannot join the time namespace of {arg}: {err}")
                else:
                    _send(live_ctl, "ok")
            else:
                _send(live_ctl, f"error unknown request {word!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m phaul.engine.nsinit")
    ap.add_argument("--ctl", type=int, required=True, help="control socket fd (SOCK_SEQPACKET)")
    ap.add_argument("criu", help="CRIU binary")
    ap.add_argument("swrk_fd", type=int, help="swrk socket fd, passed on to `criu swrk`")
    args = ap.parse_args(argv)
    ctl = socket.socket(fileno=args.ctl)
    try:
        nsutil.unshare(nsutil.CLONE_NEWPID | nsutil.CLONE_NEWNS)
    except OSError as err:
        _send(ctl, f"error unshare: {err}")
        return 1
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _run_init(args.criu, args.swrk_fd, ctl)
        except BaseException as err:  # noqa: BLE001 - pid 1 must report and exit, never raise
            _send(ctl, f"error init: {err!r}")
        finally:
            os._exit(code)
    _send(ctl, f"init {pid}")
    ctl.close()
    os.close(args.swrk_fd)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            return _exit_code(status)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as e:
        print(f"nsinit: {e}", file=sys.stderr)
        sys.exit(e.errno if e.errno and e.errno != errno.EPERM else 1)
