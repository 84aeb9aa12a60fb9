"""What a systemd unit's sandboxing lets its service see, and the paths a service needs.

``outpost install`` checks every path the unit's ExecStart needs (the executable, and
from a source checkout the interpreter, its standard library, the virtual environment
and the checkout) against the unit's own settings before it writes anything: a service
that cannot see its interpreter fails with status 203/EXEC and says no more.

Read from the unit text (systemd.exec(5)):
- ``ProtectHome=yes`` hides /home, /root and /run/user (``tmpfs``: the same, empty;
  ``read-only``: visible, read-only);
- ``PrivateTmp=yes`` gives the service its own empty /tmp and /var/tmp;
- ``ProtectSystem=strict`` makes the whole tree read-only (``full``: /usr, /boot, /efi
  and /etc; ``yes``: /usr, /boot, /efi): paths the service must write are checked
  against it, except its State/Runtime/Logs/Cache directories.

And the service runs as an unprivileged user: each folder on the way must let others in
(mode o+x) and the files must be readable (o+r).
"""

from __future__ import annotations

import site
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))
TMP_DIRS = (Path("/tmp"), Path("/var/tmp"))
READ_ONLY_BY_PROTECT_SYSTEM = {
    "strict": (Path("/"),),
    "full": (Path("/usr"), Path("/boot"), Path("/efi"), Path("/etc")),
    "yes": (Path("/usr"), Path("/boot"), Path("/efi")),
    "true": (Path("/usr"), Path("/boot"), Path("/efi")),
}
WRITABLE_DIRECTORY_KEYS = {"StateDirectory": Path("/var/lib"), "RuntimeDirectory": Path("/run"),
                           "LogsDirectory": Path("/var/log"), "CacheDirectory": Path("/var/cache")}


@dataclass(frozen=True)
class Needed:
    """A path the service needs, why, and whether it must write there."""

    path: Path
    why: str
    write: bool = False


def service_settings(unit_text: str) -> dict[str, str]:
    """The [Service] section's settings (the last one of a key wins, as in systemd)."""
    out, section = {}, ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _under(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def sandbox_problem(settings: dict[str, str], need: Needed) -> str | None:
    """Why the unit's sandboxing keeps the service from ``need``, or None."""
    path = need.path
    home = settings.get("ProtectHome", "no").lower()
    if home in ("yes", "true", "tmpfs") and any(_under(path, d) for d in HOME_DIRS):
        hidden = next(d for d in HOME_DIRS if _under(path, d))
        return f"it lies under {hidden}, which the unit's ProtectHome={home} hides"
    if home == "read-only" and need.write and any(_under(path, d) for d in HOME_DIRS):
        return "the unit's ProtectHome=read-only makes it read-only"
    if settings.get("PrivateTmp", "no").lower() in ("yes", "true") and \
            any(_under(path, d) for d in TMP_DIRS):
        hidden = next(d for d in TMP_DIRS if _under(path, d))
        return f"it lies under {hidden}, which the unit's PrivateTmp=yes replaces"
    if need.write:
        ro = READ_ONLY_BY_PROTECT_SYSTEM.get(settings.get("ProtectSystem", "no").lower(), ())
        writable = [base / name for key, base in WRITABLE_DIRECTORY_KEYS.items()
                    for name in settings.get(key, "").split()]
        if any(_under(path, d) for d in ro) and not any(_under(path, w) for w in writable):
            return (f"the unit's ProtectSystem={settings['ProtectSystem']} makes it read-only "
                    f"(only its State/Runtime/Logs/CacheDirectory are writable)")
    return None


def access_problem(path: Path) -> str | None:
    """Why an unprivileged user could not reach ``path`` on this system, or None: a
    folder on the way without o+x, or the path itself without o+r."""
    try:
        for folder in reversed(path.parents):
            if not folder.stat().st_mode & stat.S_IXOTH:
                return f"{folder} (mode {stat.filemode(folder.stat().st_mode)}) does not let " \
                       f"other users in"
        if not path.stat().st_mode & stat.S_IROTH:
            return f"it is not readable by other users (mode {stat.filemode(path.stat().st_mode)})"
    except OSError as exc:
        return f"it can't be read here: {exc.strerror}"
    return None


def problems(unit_text: str, needed: list[Needed], *, check_access: bool) -> list[str]:
    """One line per path the service could not use: the path, why it's needed, why not."""
    settings = service_settings(unit_text)
    out = []
    for need in needed:
        why_not = sandbox_problem(settings, need)
        if why_not is None and check_access:
            why_not = access_problem(need.path)
        if why_not is not None:
            out.append(f"{need.path} ({need.why}): {why_not}")
    return out


def source_needs() -> list[Needed]:
    """What `python -m appliance` from this environment needs at run time."""
    import appliance  # noqa: PLC0415

    exe = Path(sys.executable)
    out = [Needed(exe, "the interpreter ExecStart runs")]
    if exe.resolve() != exe:
        out.append(Needed(exe.resolve(), f"the interpreter {exe} resolves to"))
    out.append(Needed(Path(sys.base_prefix), "the interpreter's standard library"))
    if sys.prefix != sys.base_prefix:
        out.append(Needed(Path(sys.prefix), "the virtual environment"))
    for p in site.getsitepackages():
        out.append(Needed(Path(p), "installed packages"))
    out.append(Needed(Path(appliance.__file__).resolve().parent.parent, "outpost's code"))
    seen, unique = set(), []
    for n in out:
        if n.path not in seen:
            seen.add(n.path)
            unique.append(n)
    return unique


def frozen_needs(exec_path: Path, installed: Path) -> list[Needed]:
    return [Needed(exec_path, "the executable ExecStart runs"),
            Needed(installed, "the installed build")]


def state_needs(data_dir: Path, socket_dir: Path) -> list[Needed]:
    return [Needed(data_dir, "the state directory", write=True),
            Needed(socket_dir, "the socket's directory", write=True)]


__all__ = ["Needed", "frozen_needs", "problems", "sandbox_problem", "service_settings",
           "source_needs", "state_needs"]
