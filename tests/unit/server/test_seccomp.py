"""The local sandboxes' seccomp filter: the policy as data, compiled by libseccomp, and enforced."""

import json
import subprocess
import sys

from opensandbox_platform.server.runtimes import seccomp

FORBIDDEN = {
    "mount", "umount2", "unshare", "setns", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon",
    "settimeofday", "clock_settime", "open_by_handle_at", "userfaultfd", "pivot_root", "io_uring_setup",
    "fsopen", "open_tree", "move_mount", "sethostname", "setdomainname", "syslog", "acct", "quotactl",
    "pidfd_getfd", "kcmp", "lookup_dcookie", "iopl", "ioperm", "vhangup", "fanotify_init",
}  # fmt: skip


def test_nothing_dangerous_is_allowed() -> None:
    assert not seccomp.allowed_names() & FORBIDDEN


def test_namespace_flags_of_clone_and_clone3_are_refused() -> None:
    rules = seccomp.rules()
    (clone,) = [r for r in rules if r.name == "clone"]
    assert clone.args == (seccomp.Arg(0, "masked_eq", 0, seccomp.CLONE_NAMESPACE_FLAGS),)
    (clone3,) = [r for r in rules if r.name == "clone3"]
    assert clone3.action == 38  # ENOSYS: libc falls back to clone, whose flags the filter sees
    (socket,) = [r for r in rules if r.name == "socket"]
    assert socket.args == (seccomp.Arg(0, "ne", seccomp.AF_VSOCK),)


def test_libseccomp_compiles_it() -> None:
    program = seccomp.compile_bpf()
    assert program and len(program) % 8 == 0  # struct sock_filter entries


def test_the_isolated_sessions_variant_adds_namespaces_and_mounts_only() -> None:
    """A sandbox created with extensions {"bootstrap.execd.isolation": "enable"} (execd's bwrap sessions)."""
    default = {r.name for r in seccomp.rules() if r.action == seccomp.ALLOW}
    userns = seccomp.rules(userns=True)
    allowed = {r.name for r in userns if r.action == seccomp.ALLOW}
    assert allowed - default == set(seccomp.NESTED_NAMESPACES)
    assert not allowed & (FORBIDDEN - set(seccomp.NESTED_NAMESPACES))
    (clone,) = [r for r in userns if r.name == "clone"]
    assert clone.args == ()  # namespace flags allowed
    assert seccomp.compile_bpf(userns)


PROBE = """
import ctypes, os, socket, sys
from opensandbox_platform.server.runtimes import seccomp
lib = ctypes.CDLL(None, use_errno=True)
program = seccomp.compile_bpf()
buf = ctypes.create_string_buffer(program)
class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
prog = Prog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
assert lib.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert lib.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
results = {}
for name, call in [
    ("unshare", lambda: lib.unshare(0x10000000)),
    ("mount", lambda: lib.mount(b"none", b"/mnt", b"tmpfs", 0, None)),
    ("keyctl", lambda: lib.syscall(250, 0, 0, 0, 0)),
    ("bpf", lambda: lib.syscall(321, 0, 0, 0)),
    ("clone3", lambda: lib.syscall(435, 0, 0)),
]:
    result = call()
    results[name] = ctypes.get_errno() if result == -1 else 0
try:
    socket.socket(40, socket.SOCK_STREAM)
    results["vsock"] = 0
except OSError as exc:
    results["vsock"] = exc.errno
pid = os.fork()  # clone without namespace flags
if pid == 0:
    os._exit(7)
results["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
import json; print(json.dumps(results))
"""


def test_a_process_under_the_filter_is_refused_what_it_forbids() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert results == {"unshare": 1, "mount": 1, "keyctl": 1, "bpf": 1, "clone3": 38, "vsock": 1, "fork": 7}


def test_the_same_policy_as_a_docker_profile() -> None:
    profile = seccomp.docker_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO" and profile["defaultErrnoRet"] == 1
    entries = profile["syscalls"]
    assert isinstance(entries, list)
    allowed = set(entries[0]["names"])
    assert "read" in allowed and not allowed & FORBIDDEN
    clone = next(e for e in entries if e["names"] == ["clone"])
    assert clone["args"] == [
        {"index": 0, "value": seccomp.CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
    ]
    clone3 = next(e for e in entries if e["names"] == ["clone3"])
    assert clone3["action"] == "SCMP_ACT_ERRNO" and clone3["errnoRet"] == 38
