"""Which Jupyter kernels the sandbox's image has, found without Python's help (execd may run in
an image whose only Python is the one its kernels use).

A kernelspec is a directory `<data dir>/kernels/<name>/` holding `kernel.json` (`argv`,
`display_name`, `language`, ...). The data dirs are Jupyter's own search path: `$JUPYTER_PATH`, the
user's data dir, the `share/jupyter` of every Python prefix on `$PATH` (venvs, /usr/local) and the
system dirs. The bridge (run with the image's Python) later lists them with jupyter_client itself;
this scan only decides cheaply whether there are kernels at all, and which Python runs the bridge.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

SYSTEM_DIRS = ("/usr/local/share/jupyter", "/usr/share/jupyter")
# Names clients use for a language, mapped to what kernelspecs write in their `language` field.
ALIASES = {
    "python3": "python",
    "py": "python",
    "ipython": "python",
    "sh": "bash",
    "shell": "bash",
    "js": "javascript",
    "node": "javascript",
    "nodejs": "javascript",
    "ts": "typescript",
}
MAX_SPEC_BYTES = 64 * 1024


class KernelSpec:
    """One kernelspec. (A plain class: execd scans for kernels at every start, and a dataclass
    costs a millisecond of exec() to define.)"""

    __slots__ = ("argv", "display_name", "language", "name")

    def __init__(self, name: str, language: str, argv: tuple[str, ...], display_name: str) -> None:
        self.name = name
        self.language = language
        self.argv = argv
        self.display_name = display_name

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KernelSpec) and (self.name, self.language, self.argv, self.display_name) == (
            other.name,
            other.language,
            other.argv,
            other.display_name,
        )

    def __hash__(self) -> int:
        return hash((self.name, self.language, self.argv, self.display_name))

    def __repr__(self) -> str:
        return f"KernelSpec({self.name!r}, {self.language!r}, {self.argv!r}, {self.display_name!r})"


def canonical_language(language: str) -> str:
    name = language.strip().lower()
    return ALIASES.get(name, name)


def data_dirs(env: Mapping[str, str]) -> list[str]:
    dirs = [d for d in env.get("JUPYTER_PATH", "").split(os.pathsep) if d]
    home = env.get("HOME") or "/root"
    data_home = env.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    dirs.append(env.get("JUPYTER_DATA_DIR") or os.path.join(data_home, "jupyter"))
    for bin_dir in env.get("PATH", "").split(os.pathsep):
        if bin_dir and os.path.isfile(os.path.join(bin_dir, "python3")):
            dirs.append(os.path.join(os.path.dirname(bin_dir.rstrip("/")), "share", "jupyter"))
    dirs.extend(SYSTEM_DIRS)
    return list(dict.fromkeys(dirs))  # first occurrence wins


def scan(env: Mapping[str, str]) -> dict[str, KernelSpec]:
    """Kernelspecs by name; the first data dir that has a name wins, as in Jupyter."""
    found: dict[str, KernelSpec] = {}
    for data_dir in data_dirs(env):
        kernels = os.path.join(data_dir, "kernels")
        try:
            names = sorted(os.listdir(kernels))
        except OSError:
            continue
        for name in names:
            if name not in found:
                spec = _read(os.path.join(kernels, name, "kernel.json"), name.lower())
                if spec is not None:
                    found[spec.name] = spec
    return found


def _read(path: str, name: str) -> KernelSpec | None:
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(MAX_SPEC_BYTES))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    argv = data.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return None
    language = data.get("language")
    display = data.get("display_name")
    return KernelSpec(
        name=name,
        language=canonical_language(language) if isinstance(language, str) and language else name,
        argv=tuple(argv),
        display_name=display if isinstance(display, str) else name,
    )


def choose(specs: Mapping[str, KernelSpec], language: str) -> KernelSpec | None:
    """The kernelspec for `language` (a language name or a kernelspec name); `python3` is the
    preferred Python kernel, otherwise the first by name, so the choice is stable."""
    wanted = canonical_language(language)
    if language.strip().lower() in specs:
        return specs[language.strip().lower()]
    matches = sorted((s for s in specs.values() if s.language == wanted), key=lambda s: (s.name != "python3", s.name))
    return matches[0] if matches else None


def languages(specs: Mapping[str, KernelSpec]) -> list[str]:
    return sorted({s.language for s in specs.values()})


def which(program: str, env: Mapping[str, str]) -> str | None:
    if "/" in program:
        return program if os.access(program, os.X_OK) else None
    for bin_dir in env.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(bin_dir, program)
        if bin_dir and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def bridge_python(specs: Mapping[str, KernelSpec], env: Mapping[str, str]) -> str | None:
    """The Python that runs the bridge: `$EXECD_CODE_PYTHON`, else the interpreter of a Python
    kernelspec (ipykernel depends on jupyter_client, so that one has it), else `python3`."""
    explicit = env.get("EXECD_CODE_PYTHON")
    if explicit:
        return which(explicit, env)
    for spec in sorted(specs.values(), key=lambda s: (s.name != "python3", s.name)):
        if spec.language == "python" and os.path.basename(spec.argv[0]).startswith("python"):
            found = which(spec.argv[0], env)
            if found:
                return found
    return which("python3", env)
