"""The system-call filter of every local sandbox: Docker's default profile, a bit stricter.

`RULES` is the policy as data (what Docker's `profiles/seccomp/default.json` allows a container
without extra capabilities), so it can be read and tested; libseccomp (Debian's libseccomp2, through
ctypes) turns it into the BPF program bwrap installs with `--seccomp FD` right before it starts the
jail's first process (bwrap sets no_new_privs with it).

Anything not listed fails with EPERM: mount and the new mount API, unshare, setns, namespace flags of
clone (clone3 is ENOSYS, so libc falls back to clone, whose flags a filter can see), keyctl/add_key,
bpf, perf_event_open, userfaultfd, kernel modules, kexec, reboot, swapon, clock and time changes,
quotactl, acct, syslog, AF_VSOCK sockets, personality changes beyond Docker's list. Stricter than
Docker: io_uring (a kernel attack surface of its own, and nothing here needs it) and any
non-native ABI (32-bit x86 and x32 system calls kill the process instead of being filtered twice).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass

ALLOW = -1  # an action: allow; any other action is an errno to fail with

# Docker's default allow list (no capability-dependent entries), minus io_uring_*.
_ALLOWED = """
accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown chown32 clock_adjtime
clock_adjtime64 clock_getres clock_getres_time64 clock_gettime clock_gettime64 clock_nanosleep
clock_nanosleep_time64 close close_range connect copy_file_range creat dup dup2 dup3 epoll_create
epoll_create1 epoll_ctl epoll_ctl_old epoll_pwait epoll_pwait2 epoll_wait epoll_wait_old eventfd eventfd2
execve execveat exit exit_group faccessat faccessat2 fadvise64 fadvise64_64 fallocate fanotify_mark fchdir
fchmod fchmodat fchown fchown32 fchownat fcntl fcntl64 fdatasync fgetxattr flistxattr flock fork
fremovexattr fsetxattr fstat fstat64 fstatat64 fstatfs fstatfs64 fsync ftruncate ftruncate64 futex
futex_time64 futex_waitv futimesat getcpu getcwd getdents getdents64 getegid getegid32 geteuid geteuid32
getgid getgid32 getgroups getgroups32 getitimer getpeername getpgid getpgrp getpid getppid getpriority
getrandom getresgid getresgid32 getresuid getresuid32 getrlimit get_robust_list getrusage getsid
getsockname getsockopt get_thread_area gettid gettimeofday getuid getuid32 getxattr inotify_add_watch
inotify_init inotify_init1 inotify_rm_watch io_cancel ioctl io_destroy io_getevents io_pgetevents
io_pgetevents_time64 ioprio_get ioprio_set io_setup io_submit ipc kill landlock_add_rule
landlock_create_ruleset landlock_restrict_self lchown lchown32 lgetxattr link linkat listen listxattr
llistxattr _llseek lremovexattr lseek lsetxattr lstat lstat64 madvise membarrier memfd_create memfd_secret
mincore mkdir mkdirat mknod mknodat mlock mlock2 mlockall mmap mmap2 mprotect mq_getsetattr mq_notify
mq_open mq_timedreceive mq_timedreceive_time64 mq_timedsend mq_timedsend_time64 mq_unlink mremap msgctl
msgget msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep newfstatat _newselect
open openat openat2 pause pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect poll
ppoll ppoll_time64 prctl pread64 preadv preadv2 prlimit64 process_mrelease pselect6 pselect6_time64
pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv recv recvfrom recvmmsg
recvmmsg_time64 recvmsg remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir
rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend
rt_sigtimedwait rt_sigtimedwait_time64 rt_tgsigqueueinfo sched_getaffinity sched_getattr
sched_getparam sched_get_priority_max sched_get_priority_min sched_getscheduler sched_rr_get_interval
sched_rr_get_interval_time64 sched_setaffinity sched_setattr sched_setparam sched_setscheduler
sched_yield seccomp select semctl semget semop semtimedop semtimedop_time64 send sendfile sendfile64
sendmmsg sendmsg sendto setfsgid setfsgid32 setfsuid setfsuid32 setgid setgid32 setgroups setgroups32
setitimer setpgid setpriority setregid setregid32 setresgid setresgid32 setresuid setresuid32 setreuid
setreuid32 setrlimit set_robust_list setsid setsockopt set_thread_area set_tid_address setuid setuid32
setxattr shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4 sigprocmask sigreturn
socketcall socketpair splice stat stat64 statfs statfs64 statx symlink symlinkat sync sync_file_range
syncfs sysinfo tee tgkill time timer_create timer_delete timer_getoverrun timer_gettime timer_gettime64
timer_settime timer_settime64 timerfd_create timerfd_gettime timerfd_gettime64 timerfd_settime
timerfd_settime64 times tkill truncate truncate64 ugetrlimit umask uname unlink unlinkat utime utimensat
utimensat_time64 utimes vfork vmsplice wait4 waitid waitpid write writev
ptrace process_vm_readv process_vm_writev arch_prctl modify_ldt
chroot
"""
# ptrace and process_vm_*: Docker allows them on kernels >= 4.8 (a tracer can no longer skip the
# filter); a jail only sees its own processes. chroot: the jail keeps CAP_SYS_CHROOT, as Docker does.

_CMP_NE = 1
_CMP_EQ = 4
_CMP_MASKED_EQ = 7
AF_VSOCK = 40
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
CLONE_NAMESPACE_FLAGS = 0x7E020000
PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)  # Docker's: PER_LINUX, UNAME26, ADDR_NO_RANDOMIZE, query


@dataclass(frozen=True)
class Arg:
    """A comparison of argument `index`: `op` is "ne", "eq" or "masked_eq" (arg & mask == value)."""

    index: int
    op: str
    value: int
    mask: int = 0


@dataclass(frozen=True)
class Rule:
    name: str
    action: int = ALLOW
    args: tuple[Arg, ...] = ()


# What a sandbox that asked for execd's isolated sessions may do on top (labels.wants_isolation):
# bubblewrap and execd make user, mount, PID, IPC, UTS and network namespaces and mount overlays,
# tmpfs and binds in them. More kernel surface for that sandbox only (docs/isolated-sessions.md).
NESTED_NAMESPACES = ("unshare", "mount", "umount2", "pivot_root")


def rules(*, userns: bool = False) -> list[Rule]:
    """The filter as data: each rule allows (or fails with an errno) one system call, under
    conditions on its arguments; several rules for one call are alternatives. `userns`: the
    isolated-sessions variant (NESTED_NAMESPACES and clone with namespace flags allowed)."""
    result = [Rule(name) for name in _ALLOWED.split()]
    result.append(Rule("socket", args=(Arg(0, "ne", AF_VSOCK),)))
    result += [Rule("personality", args=(Arg(0, "eq", value),)) for value in PERSONALITIES]
    if userns:
        result += [Rule(name) for name in ("clone", *NESTED_NAMESPACES)]
    else:
        result.append(Rule("clone", args=(Arg(0, "masked_eq", 0, CLONE_NAMESPACE_FLAGS),)))
    result.append(Rule("clone3", action=errno.ENOSYS))
    return result


def allowed_names() -> set[str]:
    return {rule.name for rule in rules() if rule.action == ALLOW}


def docker_profile(policy: list[Rule] | None = None) -> dict[str, object]:
    """The same policy in the format of Docker's `seccomp=` security option (the docker runtime's
    builtin profile), for x86-64."""
    allowed = sorted(r.name for r in (policy or rules()) if r.action == ALLOW and not r.args)
    syscalls: list[dict[str, object]] = [{"names": allowed, "action": "SCMP_ACT_ALLOW"}]
    for rule in policy or rules():
        if rule.action == ALLOW and not rule.args:
            continue
        entry: dict[str, object] = {"names": [rule.name]}
        if rule.action == ALLOW:
            entry["action"] = "SCMP_ACT_ALLOW"
        else:
            entry.update(action="SCMP_ACT_ERRNO", errnoRet=rule.action)
        if rule.args:
            entry["args"] = [_docker_arg(arg) for arg in rule.args]
        syscalls.append(entry)
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": errno.EPERM,
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": syscalls,
    }


def _docker_arg(arg: Arg) -> dict[str, object]:
    op = {"ne": "SCMP_CMP_NE", "eq": "SCMP_CMP_EQ", "masked_eq": "SCMP_CMP_MASKED_EQ"}[arg.op]
    if arg.op == "masked_eq":
        return {"index": arg.index, "value": arg.mask, "valueTwo": arg.value, "op": op}
    return {"index": arg.index, "value": arg.value, "valueTwo": 0, "op": op}


# -- libseccomp ----------------------------------------------------------------------------------

_ACT_ALLOW = 0x7FFF0000
_ACT_ERRNO = 0x00050000
_OPS = {"ne": _CMP_NE, "eq": _CMP_EQ, "masked_eq": _CMP_MASKED_EQ}


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise RuntimeError("the local runtime needs libseccomp: apt-get install libseccomp2") from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _action(action: int) -> int:
    return _ACT_ALLOW if action == ALLOW else _ACT_ERRNO | (action & 0xFFFF)


def _add(lib: ctypes.CDLL, ctx: int, rule: Rule) -> None:
    number = lib.seccomp_syscall_resolve_name(rule.name.encode())
    if number < 0:  # not a system call of this architecture (chown32, socketcall, ...)
        return
    cmps = (_ArgCmp * max(len(rule.args), 1))()
    for i, arg in enumerate(rule.args):
        datum_a, datum_b = (arg.mask, arg.value) if arg.op == "masked_eq" else (arg.value, 0)
        cmps[i] = _ArgCmp(arg.index, _OPS[arg.op], datum_a, datum_b)
    result = lib.seccomp_rule_add_array(ctx, _action(rule.action), number, len(rule.args), cmps)
    if result < 0:
        raise OSError(-result, f"seccomp rule for {rule.name}: {os.strerror(-result)}")


def compile_bpf(policy: list[Rule] | None = None) -> bytes:
    """The filter as a classic BPF program (what `bwrap --seccomp FD` reads), for this machine's ABI."""
    lib = _library()
    ctx = lib.seccomp_init(_ACT_ERRNO | errno.EPERM)
    if not ctx:
        raise RuntimeError("seccomp_init failed")
    try:
        for rule in policy if policy is not None else rules():
            _add(lib, ctx, rule)
        fd = os.memfd_create("opensandbox-seccomp-export", os.MFD_CLOEXEC)
        try:
            result = lib.seccomp_export_bpf(ctx, fd)
            if result < 0:
                raise OSError(-result, f"seccomp_export_bpf: {os.strerror(-result)}")
            os.lseek(fd, 0, os.SEEK_SET)
            return _read_all(fd)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def program_fd(program: bytes) -> int:
    """A fresh fd to read `program` from (bwrap reads its --seccomp fd to the end, once)."""
    fd = os.memfd_create("opensandbox-seccomp", os.MFD_CLOEXEC)
    os.write(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
