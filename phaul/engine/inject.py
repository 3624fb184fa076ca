"""Running syscalls inside another process with ptrace, the way CRIU's compel does.

Theory of operation
-------------------
One thread of the target is seized (``PTRACE_SEIZE`` with ``PTRACE_O_TRACESYSGOOD`` and, as
root, ``PTRACE_O_SUSPEND_SECCOMP`` so a seccomp filter cannot kill the target for our syscall)
and interrupted (``PTRACE_INTERRUPT``). While we wait for its ``PTRACE_EVENT_STOP``,
signal-delivery-stops are swallowed and remembered; they are sent again with ``tgkill`` after
detaching. The thread's registers are saved, then for each injected syscall we point ``rip`` at a
``syscall`` instruction (``0f 05``) that already exists in the target's ``[vdso]`` (no code is
written into the target), put the number and arguments in the registers with ``orig_rax = -1``
(so the kernel's signal-restart logic leaves them alone), and step with ``PTRACE_SYSCALL`` to the
syscall-entry and syscall-exit stops; ``rax`` at the exit stop is the result. Finally the saved
registers are put back with compel's restart fix-up (a thread interrupted inside a blocking
syscall resumes that syscall: ``-ERESTART*`` -> re-execute it, ``-ERESTART_RESTARTBLOCK`` ->
``restart_syscall``) and the thread is detached.

ptrace requests are only accepted from the thread that attached, so a whole session
(attach -> injections -> detach) runs on one dedicated thread. If the interrupted thread does not
stop in time (uninterruptible sleep), the caller gets :class:`InjectionFailed` while the dedicated
thread keeps waiting in the background and detaches as soon as the stop arrives (a running tracee
cannot be detached).

Pitfalls (``/work/shared/reference/uffd-wp-tracking.md``, section 6): ``PTRACE_INTERRUPT`` makes
``epoll_wait``/``sigtimedwait``/``semop`` return ``EINTR`` in the interrupted thread, so a thread
that is not blocked in one of those is chosen when there is one. x86_64 only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from phaul.errors import AccessDenied, PhaulError, ProcessGone

log = logging.getLogger(__name__)

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_ptrace.restype = ctypes.c_long
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

PTRACE_CONT = 7
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_O_TRACESYSGOOD = 1
PTRACE_O_SUSPEND_SECCOMP = 1 << 21
PTRACE_EVENT_STOP = 128
WALL = 0x40000000

# x86_64 syscall numbers.
SYS_READ = 0
SYS_CLOSE = 3
SYS_GETPID = 39
SYS_RESTART_SYSCALL = 219
SYS_TGKILL = 234
SYS_USERFAULTFD = 323
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438

ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516

# Syscalls that PTRACE_INTERRUPT turns into a visible EINTR (signal(7), "interrupted by a stop
# signal"): avoid injecting into a thread blocked in one of them.
_EINTR_ON_STOP = frozenset(
    {
        232,  # epoll_wait
        281,  # epoll_pwait
        441,  # epoll_pwait2
        128,  # rt_sigtimedwait
        65,  # semop
        220,  # semtimedop
    }
)

O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000
UFFD_USER_MODE_ONLY = 1

_U64 = (1 << 64) - 1


_REG_NAMES = (
    "r15",
    "r14",
    "r13",
    "r12",
    "rbp",
    "rbx",
    "r11",
    "r10",
    "r9",
    "r8",
    "rax",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "orig_rax",
    "rip",
    "cs",
    "eflags",
    "rsp",
    "ss",
    "fs_base",
    "gs_base",
    "ds",
    "es",
    "fs",
    "gs",
)


class UserRegs(ctypes.Structure):
    """``struct user_regs_struct`` of x86_64 (27 x u64)."""

    _fields_ = [(name, ctypes.c_ulonglong) for name in _REG_NAMES]


class InjectionFailed(PhaulError):
    """Running a syscall inside the target failed (timeout, no syscall instruction, bad stop)."""

    code = "injection-failed"
    exit_code = 3


@dataclass(frozen=True)
class InjectConfig:
    """Timeouts of one injection session, in seconds."""

    stop_timeout: float = 2.0  # PTRACE_INTERRUPT -> PTRACE_EVENT_STOP (D-state threads delay it)
    syscall_timeout: float = 5.0  # each syscall-entry/exit stop
    session_timeout: float = 10.0  # the whole session, as seen by the caller


def _signed(value: int) -> int:
    return value - (1 << 64) if value & (1 << 63) else value


def _ptrace_call(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    ctypes.set_errno(0)
    ret = int(_ptrace(request, tid, ctypes.c_void_p(addr), ctypes.c_void_p(data)))
    if ret == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, f"ptrace({request:#x}, {tid}): {os.strerror(err)}")
    return ret


def _translate(pid: int, err: OSError, what: str) -> PhaulError:
    if err.errno == errno.ESRCH:
        return ProcessGone(f"process {pid} is gone ({what})")
    if err.errno in (errno.EPERM, errno.EACCES):
        return AccessDenied(f"not allowed to {what} process {pid}: {err.strerror}")
    return InjectionFailed(f"{what} process {pid} failed: {err.strerror}")


def _read_task_syscall(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/syscall") as f:
            return f.read().split(" ", 1)[0].strip()
    except OSError:
        return ""


def choose_thread(pid: int) -> int:
    """Pick the thread to inject into: one running or in a restartable syscall if possible.

    Raises :class:`ProcessGone` if the process does not exist.
    """
    try:
        tids = sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError as err:
        raise ProcessGone(f"process {pid} does not exist") from err
    except PermissionError as err:
        raise AccessDenied(f"cannot list threads of process {pid}") from err
    # The main thread first: it is the usual choice, and the one CRIU would take.
    for tid in tids:
        state = _read_task_syscall(pid, tid)
        if state == "running":
            return tid
        if state and state.lstrip("-").isdigit() and int(state) not in _EINTR_ON_STOP:
            return tid
    return tids[0] if tids else pid


def find_syscall_insn(pid: int) -> int:
    """Address of a ``syscall`` instruction (``0f 05``) in the target's vDSO (or any r-x map)."""
    candidates: list[tuple[int, int]] = []
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError as err:
        raise ProcessGone(f"process {pid} does not exist") from err
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or "x" not in fields[1] or "r" not in fields[1]:
            continue
        lo, hi = (int(v, 16) for v in fields[0].split("-"))
        if len(fields) >= 6 and fields[5] == "[vdso]":
            candidates.insert(0, (lo, hi))
        elif len(fields) < 6 or fields[5] != "[vsyscall]":
            candidates.append((lo, hi))
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise _translate(pid, err, "open the memory of") from err
    try:
        for lo, hi in candidates:
            try:
                data = os.pread(fd, min(hi - lo, 1 << 20), lo)
            except OSError:
                continue
            off = data.find(b"\x0f\x05")
            if off >= 0:
                return lo + off
    finally:
        os.close(fd)
    raise InjectionFailed(f"no syscall instruction found in process {pid}")


class Injector:
    """A seized, stopped thread into which syscalls can be injected.

    Only valid inside the callback given to :func:`run_injected`, on the thread that runs it.
    """

    def __init__(self, pid: int, tid: int, config: InjectConfig) -> None:
        self.pid = pid
        self.tid = tid
        self._config = config
        self._saved = UserRegs()
        self._syscall_addr = 0
        self.swallowed: list[int] = []
        self.is_stopped = False

    # -- waiting -----------------------------------------------------------------------------

    def _wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        delay = 0.0
        while True:
            try:
                wpid, status = os.waitpid(self.tid, WALL | os.WNOHANG)
            except ChildProcessError as err:
                raise ProcessGone(f"thread {self.tid} of {self.pid} is gone") from err
            if wpid == self.tid:
                if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    raise ProcessGone(f"process {self.pid} exited during injection")
                return status
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(delay)
            delay = min(0.001, delay + 0.00005)

    def _wait_syscall_stop(self) -> None:
        """Resume with PTRACE_SYSCALL until the next syscall stop, swallowing signals."""
        sig = 0
        while True:
            _ptrace_call(PTRACE_SYSCALL, self.tid, 0, sig)
            sig = 0
            try:
                status = self._wait(self._config.syscall_timeout)
            except TimeoutError as err:
                raise InjectionFailed(
                    f"thread {self.tid} of {self.pid} did not reach a syscall stop"
                ) from err
            if not os.WIFSTOPPED(status):
                raise InjectionFailed(f"unexpected wait status {status:#x}")
            stopsig = os.WSTOPSIG(status)
            if stopsig == (signal.SIGTRAP | 0x80):
                return
            if status >> 16 == PTRACE_EVENT_STOP:
                # Group stop (the target is SIGSTOPped) or a late interrupt: resume again.
                continue
            # A signal-delivery-stop: suppress it now, send it again after detaching.
            self.swallowed.append(stopsig)

    # -- the session -------------------------------------------------------------------------

    def attach(self) -> None:
        opts = PTRACE_O_TRACESYSGOOD
        if os.geteuid() == 0:
            opts |= PTRACE_O_SUSPEND_SECCOMP
        try:
            _ptrace_call(PTRACE_SEIZE, self.tid, 0, opts)
        except OSError as err:
            if (
                err.errno == errno.EPERM
                and opts & PTRACE_O_SUSPEND_SECCOMP
                and not _seccomp(self.pid)
            ):
                _ptrace_call(PTRACE_SEIZE, self.tid, 0, PTRACE_O_TRACESYSGOOD)
            else:
                raise _translate(self.pid, err, "ptrace-seize") from err
        try:
            _ptrace_call(PTRACE_INTERRUPT, self.tid)
        except OSError as err:
            raise _translate(self.pid, err, "interrupt") from err

    def wait_interrupt_stop(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            status = self._wait(max(0.0, deadline - time.monotonic()))
            if not os.WIFSTOPPED(status):
                raise InjectionFailed(f"unexpected wait status {status:#x}")
            if status >> 16 == PTRACE_EVENT_STOP:
                self.is_stopped = True
                return
            # Signal-delivery-stop (or a stray syscall stop): swallow and keep waiting.
            stopsig = os.WSTOPSIG(status)
            if stopsig != (signal.SIGTRAP | 0x80):
                self.swallowed.append(stopsig)
            _ptrace_call(PTRACE_CONT, self.tid, 0, 0)

    def prepare(self) -> None:
        _ptrace_call(PTRACE_GETREGS, self.tid, 0, ctypes.addressof(self._saved))
        self._syscall_addr = find_syscall_insn(self.pid)

    def syscall(self, nr: int, *args: int) -> int:
        """Run syscall ``nr`` in the target; return its raw result (``-errno`` on failure)."""
        if len(args) > 6:
            raise ValueError("at most 6 syscall arguments")
        regs = UserRegs()
        ctypes.pointer(regs)[0] = self._saved
        regs.rax = nr
        full = (*args, 0, 0, 0, 0, 0, 0)
        regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9 = (a & _U64 for a in full[:6])
        regs.rip = self._syscall_addr
        regs.orig_rax = _U64  # -1: no restart logic on our registers
        try:
            _ptrace_call(PTRACE_SETREGS, self.tid, 0, ctypes.addressof(regs))
            self._wait_syscall_stop()  # entry
            out = UserRegs()
            _ptrace_call(PTRACE_GETREGS, self.tid, 0, ctypes.addressof(out))
            if out.orig_rax != nr:
                raise InjectionFailed(
                    f"thread {self.tid}: syscall-entry stop for {out.orig_rax}, expected {nr}"
                )
            self._wait_syscall_stop()  # exit
            _ptrace_call(PTRACE_GETREGS, self.tid, 0, ctypes.addressof(out))
        except OSError as err:
            raise _translate(self.pid, err, "inject a syscall into") from err
        result = _signed(out.rax)
        log.debug(
            "pid %d tid %d: injected syscall %d%r -> %d", self.pid, self.tid, nr, args, result
        )
        return result

    def restore_and_detach(self) -> None:
        regs = self._saved
        orig = _signed(regs.orig_rax)
        rax = _signed(regs.rax)
        if orig >= 0:
            if rax in (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND):
                regs.rax = regs.orig_rax
                regs.rip -= 2
            elif rax == -ERESTART_RESTARTBLOCK:
                regs.rax = SYS_RESTART_SYSCALL
                regs.rip -= 2
        regs.orig_rax = _U64
        try:
            _ptrace_call(PTRACE_SETREGS, self.tid, 0, ctypes.addressof(regs))
        finally:
            self.detach()

    def detach(self) -> None:
        try:
            _ptrace_call(PTRACE_DETACH, self.tid, 0, 0)
        except OSError as err:
            log.warning("pid %d: detaching thread %d failed: %s", self.pid, self.tid, err)
        for sig in self.swallowed:
            _syscall(
                ctypes.c_long(SYS_TGKILL),
                ctypes.c_long(self.pid),
                ctypes.c_long(self.tid),
                ctypes.c_long(sig),
            )
        if self.swallowed:
            log.debug("pid %d: re-sent swallowed signals %r", self.pid, self.swallowed)


def _seccomp(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_injected(
    pid: int,
    body: Callable[[Injector], T],
    *,
    tid: int | None = None,
    config: InjectConfig = InjectConfig(),  # noqa: B008 - frozen, immutable default
) -> T:
    """Seize a thread of ``pid``, call ``body(injector)`` with it stopped, restore and detach.

    The whole session runs on one dedicated thread (ptrace's rule); ``body`` runs there too.
    Raises :class:`ProcessGone`, :class:`AccessDenied` or :class:`InjectionFailed`; the target is
    detached and its registers restored on every path that can restore them.
    """
    if platform.machine() != "x86_64":
        raise InjectionFailed(
            f"syscall injection is implemented for x86_64 only, not {platform.machine()}"
        )
    chosen = tid if tid is not None else choose_thread(pid)
    result: list[T] = []
    failure: list[BaseException] = []
    handed_back = threading.Event()

    def session() -> None:
        inj = Injector(pid, chosen, config)
        try:
            inj.attach()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            failure.append(err)
            handed_back.set()
            return
        try:
            try:
                inj.wait_interrupt_stop(config.stop_timeout)
            except TimeoutError:
                failure.append(
                    InjectionFailed(
                        f"thread {chosen} of process {pid} did not stop within "
                        f"{config.stop_timeout} s (uninterruptible sleep?)"
                    )
                )
                handed_back.set()
                # A running tracee cannot be detached: wait for the stop, then let it go.
                with contextlib.suppress(Exception):
                    inj.wait_interrupt_stop(3600.0)
                inj.detach()
                return
            try:
                inj.prepare()
                result.append(body(inj))
            finally:
                inj.restore_and_detach()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            failure.append(err)
        finally:
            handed_back.set()

    started = time.monotonic()
    worker = threading.Thread(target=session, name=f"phaul-inject-{pid}", daemon=True)
    worker.start()
    if not handed_back.wait(config.session_timeout):
        raise InjectionFailed(f"injection into process {pid} did not finish in time")
    if failure:
        raise failure[0]
    worker.join(config.session_timeout)
    log.debug("pid %d: injection session took %.3f ms", pid, (time.monotonic() - started) * 1e3)
    return result[0]


def pidfd_open(pid: int) -> int:
    """``pidfd_open(pid, 0)``; raises :class:`ProcessGone` / :class:`AccessDenied`."""
    fd = int(_syscall(ctypes.c_long(SYS_PIDFD_OPEN), ctypes.c_long(pid), ctypes.c_long(0)))
    if fd < 0:
        err = ctypes.get_errno()
        raise _translate(pid, OSError(err, os.strerror(err)), "pidfd_open")
    return fd


def pidfd_getfd(pidfd: int, pid: int, targetfd: int) -> int:
    """Duplicate the target's fd ``targetfd`` into this process (the copy is O_CLOEXEC)."""
    fd = int(
        _syscall(
            ctypes.c_long(SYS_PIDFD_GETFD),
            ctypes.c_long(pidfd),
            ctypes.c_long(targetfd),
            ctypes.c_long(0),
        )
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise _translate(pid, OSError(err, os.strerror(err)), "pidfd_getfd from")
    return fd


def take_userfaultfd(pid: int, *, config: InjectConfig = InjectConfig()) -> int:  # noqa: B008
    """Create a userfaultfd inside ``pid`` and move it into this process.

    Injects ``userfaultfd(O_CLOEXEC|O_NONBLOCK|UFFD_USER_MODE_ONLY)``, copies the new fd with
    ``pidfd_getfd`` and injects ``close()`` of it, so the target's fd table ends as it began.
    The uffd is not API-initialised yet. Raises :class:`ProcessGone`, :class:`AccessDenied` (the
    kernel or a seccomp filter refused) or :class:`InjectionFailed`.
    """
    pidfd = pidfd_open(pid)
    try:

        def body(inj: Injector) -> int:
            fd = inj.syscall(SYS_USERFAULTFD, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)
            if fd == SYS_USERFAULTFD:
                # seccomp rolled the registers back: the call never ran.
                raise AccessDenied(f"userfaultfd() is blocked in process {pid} (seccomp)")
            if fd < 0:
                err = OSError(-fd, os.strerror(-fd))
                raise _translate(pid, err, "create a userfaultfd in")
            try:
                return pidfd_getfd(pidfd, pid, fd)
            finally:
                closed = inj.syscall(SYS_CLOSE, fd)
                if closed < 0:
                    log.warning("pid %d: close(%d) of the injected uffd: %d", pid, fd, closed)

        return run_injected(pid, body, config=config)
    finally:
        os.close(pidfd)


def run_frozen(
    pid: int,
    body: Callable[[], T],
    *,
    config: InjectConfig = InjectConfig(),  # noqa: B008 - frozen, immutable default
) -> T:
    """Stop every thread of ``pid`` (ptrace seize + interrupt), call ``body()``, let them go.

    Used where something must be atomic with respect to the target (reading and clearing
    soft-dirty bits). Threads created while stopping are caught by re-listing until the set is
    stable. Swallowed signals are re-sent. Raises ProcessGone, AccessDenied, InjectionFailed.
    """
    result: list[T] = []
    failure: list[BaseException] = []
    handed_back = threading.Event()

    def session() -> None:
        stopped: dict[int, Injector] = {}
        try:
            deadline = time.monotonic() + config.stop_timeout
            while True:
                try:
                    tids = sorted(int(t.name) for t in Path(f"/proc/{pid}/task").iterdir())
                except FileNotFoundError as err:
                    raise ProcessGone(f"process {pid} is gone") from err
                new = [t for t in tids if t not in stopped]
                if not new:
                    break
                for tid in new:
                    inj = Injector(pid, tid, config)
                    try:
                        inj.attach()
                    except ProcessGone:
                        continue  # the thread exited meanwhile
                    stopped[tid] = inj
                    try:
                        inj.wait_interrupt_stop(max(0.0, deadline - time.monotonic()))
                    except TimeoutError as err:
                        raise InjectionFailed(
                            f"thread {tid} of process {pid} did not stop within "
                            f"{config.stop_timeout} s (uninterruptible sleep?)"
                        ) from err
            result.append(body())
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            failure.append(err)
        handed_back.set()
        for inj in stopped.values():
            if not inj.is_stopped:
                # A running tracee cannot be detached: wait for its stop first.
                with contextlib.suppress(Exception):
                    inj.wait_interrupt_stop(3600.0)
            inj.detach()

    worker = threading.Thread(target=session, name=f"phaul-freeze-{pid}", daemon=True)
    worker.start()
    if not handed_back.wait(config.session_timeout):
        raise InjectionFailed(f"freezing process {pid} did not finish in time")
    if failure:
        raise failure[0]
    worker.join(config.session_timeout)
    return result[0]
