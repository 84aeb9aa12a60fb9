"""Installing outpost on a device: what goes where, as a plan of steps.

``plan(options)`` decides everything and touches nothing; each step can ``describe()``
itself (``outpost install --dry-run``) or ``apply()`` itself. Every path is placed under
``options.root`` so an install can be made into a temporary folder and inspected; the
steps that act on the live system (creating the user, systemctl) run only when the root
is ``/``.

Layout on the device (docs/operations.md explains each):

    /opt/outpost/<version>/          the executable (a one-folder build), never changed
    /opt/outpost/current -> <version>  switched atomically on upgrade
    /usr/local/bin/outpost -> /opt/outpost/current/outpost
    /etc/outpost/config.toml         the appliance config (kept if present)
    /etc/sysusers.d/outpost.conf     the dedicated system user
    /etc/systemd/system/outpost.service
    /var/lib/outpost                 state (systemd StateDirectory=)
    /run/outpost/outpost.sock        the socket (systemd RuntimeDirectory=)
"""

from __future__ import annotations

import grp
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance import __version__
from appliance.deploy import sandbox
from appliance.errors import ConfigError, FailedPrecondition, InvalidArgument
from engines.files import atomic_symlink, atomic_write_bytes

PREFIX = Path("/opt/outpost")
BIN_LINK = Path("/usr/local/bin/outpost")
CONFIG_DIR = Path("/etc/outpost")
CONFIG_PATH = CONFIG_DIR / "config.toml"
UNIT_PATH = Path("/etc/systemd/system/outpost.service")
# where a reinstall keeps a unit that differed from the one it writes (not a unit folder)
UNIT_KEPT_PATH = CONFIG_DIR / "outpost.service.replaced"
UNIT_FILE = "outpost.service"  # the shipped unit, beside this module: written for the defaults
SYSUSERS_PATH = Path("/etc/sysusers.d/outpost.conf")
STATE_DIR = Path("/var/lib/outpost")
RUNTIME_DIR = Path("/run/outpost")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,30}")

SYSUSERS_TEMPLATE = 'u {user} - "Outpost appliance" {state_dir} -\n'

CONFIG_TEMPLATE = """\
# outpost appliance config. Every key, its default and its meaning: docs/operations.md.
# The effective config (this file with defaults filled in): outpost config show --config {config}
data_dir = "{state_dir}"

[server]
socket_path = "{socket}"
socket_mode = "0660"   # the group '{user}' may connect: add local apps' users to it
# tcp = "0.0.0.0:7070"  # TCP for the factory LAN; needs token or token_file
# token_file = "/etc/outpost/token"

[logging]
level = "info"
format = "json"        # one JSON object a line, into the journal
"""


@dataclass(frozen=True)
class Options:
    root: Path = Path("/")
    user: str = "outpost"
    source: Path | None = None  # a built dist/outpost folder or one-file executable
    force_config: bool = False
    enable: bool = False  # systemctl enable --now (live installs only)


@dataclass
class Step:
    """One thing the install does. ``apply`` is idempotent."""

    what: str
    action: Callable[[], None] | None = None  # None: nothing to do, only to say

    def describe(self) -> str:
        return self.what

    def apply(self) -> None:
        if self.action is not None:
            self.action()


def under(root: Path, path: Path) -> Path:
    """``path`` (absolute, as seen on the device) inside ``root``."""
    return root / path.relative_to("/")


def running_build() -> Path | None:
    """The frozen build this process runs from: its folder, or the one-file executable."""
    if not getattr(sys, "frozen", False):
        return None
    exe = Path(sys.executable).resolve()
    bundle = Path(getattr(sys, "_MEIPASS", exe.parent)).resolve()
    return exe.parent if bundle.is_relative_to(exe.parent) else exe


def build_version(source: Path) -> str:
    """The version a build reports (`outpost --version`), from the build itself."""
    exe = source / "outpost" if source.is_dir() else source
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise InvalidArgument(
            f"--from {source}: no 'outpost' executable there; give the folder build/freeze.sh "
            f"made (dist/outpost) or a one-file build")
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True,
                             timeout=60, check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise InvalidArgument(f"--from {source}: '{exe} --version' failed: {exc}") from exc
    match = re.fullmatch(r"outpost (\S+)\s*", out)
    if not match:
        raise InvalidArgument(f"--from {source}: '{exe} --version' said {out.strip()!r}, "
                              "not 'outpost VERSION': is this an outpost build?")
    return match.group(1)


def unit_file() -> Path:
    """The shipped unit: beside this module (source tree, wheel), or in the frozen app."""
    here = Path(__file__).resolve().parent / UNIT_FILE
    if not here.is_file() and getattr(sys, "_MEIPASS", None):
        return Path(sys._MEIPASS) / "appliance" / "deploy" / UNIT_FILE
    return here


def render_unit(exec_start: str, user: str = "outpost", video_group: bool = False) -> str:
    """The shipped unit with this install's user, executable, and the video group where
    the system has it; for the defaults, the shipped file itself."""
    default_exec = re.escape(f"ExecStart={PREFIX / 'current' / 'outpost'} ")
    groups = "SupplementaryGroups=video\n" if video_group else ""
    text = unit_file().read_text()
    for pattern, new in ((r"^User=outpost$", f"User={user}"),
                         (r"^Group=outpost$", f"Group={user}"),
                         (f"^{default_exec}", f"{groups}ExecStart={exec_start} ")):
        text, count = re.subn(pattern, lambda _m, new=new: new, text, flags=re.MULTILINE)
        if count != 1:
            raise RuntimeError(f"{unit_file()}: needs exactly one line matching {pattern!r}")
    return text


def render_config(user: str = "outpost") -> str:
    return CONFIG_TEMPLATE.format(state_dir=STATE_DIR, socket=RUNTIME_DIR / "outpost.sock",
                                  user=user, config=CONFIG_PATH)


def _group_exists(root: Path, name: str) -> bool:
    if root == Path("/"):
        try:
            grp.getgrnam(name)
            return True
        except KeyError:
            return False
    try:
        lines = under(root, Path("/etc/group")).read_text().splitlines()
    except OSError:
        return False
    return any(line.split(":", 1)[0] == name for line in lines)


def _copy_build(source: Path, dest: Path) -> None:
    """Copy to a sibling, then rename into place: a half-copied build is never `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.{os.getpid()}.new")
    shutil.rmtree(staging, ignore_errors=True)
    if source.is_dir():
        shutil.copytree(source, staging, symlinks=True)
    else:
        staging.mkdir()
        shutil.copy2(source, staging / "outpost")
    if dest.exists():  # reinstalling the same version: swap, then drop the old copy
        old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
        os.replace(dest, old)
        os.replace(staging, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, dest)


def _check_existing_config(path: Path) -> None:
    from appliance.config.load import load_config  # noqa: PLC0415

    try:
        load_config(path)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (the existing config was kept: fix it, or pass "
                          "--force-config to replace it with the default)") from exc


def _create_user(user: str, sysusers: Path) -> None:
    """On this system: systemd-sysusers, else useradd; nothing if the user exists."""
    import pwd  # noqa: PLC0415

    try:
        pwd.getpwnam(user)
        return
    except KeyError:
        pass
    if shutil.which("systemd-sysusers"):
        cmd = ["systemd-sysusers", str(sysusers)]
    else:
        cmd = ["useradd", "--system", "--user-group", "--home-dir", str(STATE_DIR),
               "--no-create-home", "--shell", "/usr/sbin/nologin", user]
    _run(cmd)


def _run(cmd: list[str]) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as exc:
        raise FailedPrecondition(f"{cmd[0]} is not on this system: {exc}") from exc
    except subprocess.CalledProcessError as exc:
        raise FailedPrecondition(
            f"'{shlex.join(cmd)}' failed ({exc.returncode}): {exc.stderr.strip()}") from exc


def plan(options: Options) -> list[Step]:
    """Every step of the install, in order. Reads the system; changes nothing."""
    if not _USER_NAME.fullmatch(options.user):
        raise InvalidArgument(f"--user {options.user!r} is not a valid system user name "
                              "(lower case letters, digits, '_' and '-')")
    root = options.root
    live = root == Path("/")
    steps: list[Step] = []

    source = options.source or running_build()
    if source is not None:
        source = source.resolve()
        version = build_version(source) if options.source else __version__
        installed = PREFIX / version
        steps.append(Step(f"copy the build {source} to {under(root, installed)}",
                          lambda: _copy_build(source, under(root, installed))))
        steps.append(Step(f"point {under(root, PREFIX / 'current')} at {version}",
                          lambda: atomic_symlink(under(root, PREFIX / "current"),
                                                  Path(version))))
        steps.append(Step(f"link {under(root, BIN_LINK)} -> {PREFIX / 'current' / 'outpost'}",
                          lambda: atomic_symlink(under(root, BIN_LINK),
                                                  PREFIX / "current" / "outpost")))
        exec_start = str(PREFIX / "current" / "outpost")
        needed = sandbox.frozen_needs(PREFIX / "current" / "outpost", PREFIX / version)
    else:
        # From source (a venv install): the service runs this same Python's outpost, if
        # the unit's sandboxing lets it see that Python (checked below).
        from appliance.paths import outpost_command  # noqa: PLC0415

        exec_start = shlex.join(outpost_command())
        needed = sandbox.source_needs()
        steps.append(Step(f"no frozen build given (--from): the service will run "
                          f"'{exec_start}'"))

    sysusers = under(root, SYSUSERS_PATH)
    steps.append(Step(f"write {sysusers} (system user '{options.user}')",
                      lambda: atomic_write_bytes(sysusers, SYSUSERS_TEMPLATE.format(
                          user=options.user, state_dir=STATE_DIR).encode())))
    if live:
        steps.append(Step(f"create the system user '{options.user}' if it does not exist",
                          lambda: _create_user(options.user, sysusers)))
    elif shutil.which("systemd-sysusers") and os.geteuid() == 0:
        # An image: add the user to the image's own passwd and group files.
        steps.append(Step(f"create the system user '{options.user}' in {root}/etc/passwd",
                          lambda: _run(["systemd-sysusers", f"--root={root}", str(sysusers)])))
    else:
        steps.append(Step(f"the user '{options.user}' is created at first boot by "
                          "systemd-sysusers (it needs root and systemd-sysusers here)"))

    config = under(root, CONFIG_PATH)
    if config.exists() and not options.force_config:
        _check_existing_config(config)
        steps.append(Step(f"keep the existing config {config} (valid)"))
    else:
        text = render_config(options.user)
        # World-readable like most of /etc: it holds no secret (a token belongs in
        # server.token_file, mode 0640 root:outpost; docs/operations.md).
        steps.append(Step(f"write the default config {config}",
                          lambda: atomic_write_bytes(config, text.encode(), 0o644)))

    unit = under(root, UNIT_PATH)
    unit_text = render_unit(exec_start, options.user, _group_exists(root, "video"))
    needed += sandbox.state_needs(STATE_DIR, RUNTIME_DIR)
    refused = sandbox.problems(unit_text, needed, check_access=source is None)
    if refused:
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        kind = "this source checkout" if source is None else f"the build {source}"
        raise FailedPrecondition(
            f"the service could not start from {kind}: {refused[0]}{more}; install a "
            f"self-contained frozen build instead: build/freeze.sh, then 'outpost install "
            f"--from dist/outpost'")
    steps.append(Step(f"check the {len(needed)} paths the service needs against the unit's "
                      f"sandboxing (ProtectHome, PrivateTmp, ProtectSystem): all reachable"))
    if unit.is_file() and unit.read_bytes() != unit_text.encode():
        kept = under(root, UNIT_KEPT_PATH)
        steps.append(Step(
            f"replace {unit}, which differs from the unit this install writes (edited by "
            f"hand, or an older outpost's): the old one is kept as {kept}; local changes "
            f"belong in a drop-in ('systemctl edit outpost'), which a reinstall leaves alone",
            lambda: atomic_write_bytes(kept, unit.read_bytes(), 0o644)))
    steps.append(Step(f"write the systemd unit {unit}",
                      lambda: atomic_write_bytes(unit, unit_text.encode())))
    if live:
        steps.append(Step("systemctl daemon-reload", lambda: _run(["systemctl", "daemon-reload"])))
        if options.enable:
            steps.append(Step("systemctl enable --now outpost.service",
                              lambda: _run(["systemctl", "enable", "--now", "outpost.service"])))
    return steps


def check_can_apply(options: Options) -> None:
    if options.root == Path("/") and os.geteuid() != 0:
        raise FailedPrecondition(
            "installing into / needs root: run 'sudo outpost install', or see what it would "
            "do with --dry-run, or install into a folder with --root DIR")
    _check_writable(options.root)


def _check_writable(root: Path) -> None:
    """Try to write where the install begins (the root, or its nearest existing folder):
    a root that can't be written stops the install before its first step, not inside it.
    Tried, not read off the mode bits: root may write what they forbid, and a read-only
    file system refuses root too."""
    import tempfile  # noqa: PLC0415

    folder = root
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return  # a file in the way: the first step says so
    try:
        fd, probe = tempfile.mkstemp(prefix=".outpost-install-", dir=folder)
    except OSError as exc:
        raise FailedPrecondition(
            f"--root {root}: can't write there ({folder}: {exc.strerror}); install into a "
            f"folder you can write to, or as a user who can") from None
    os.close(fd)
    os.unlink(probe)


def next_steps(options: Options) -> list[str]:
    if options.root != Path("/"):
        return [f"installed into {options.root}; nothing on this system was changed"]
    out = [] if options.enable else ["start it: systemctl enable --now outpost"]
    return [*out, "follow its log: journalctl -u outpost -f",
            f"let a local app connect: usermod -aG {options.user} APPUSER"]


__all__ = ["Options", "Step", "check_can_apply", "next_steps", "plan", "render_config",
           "render_unit", "running_build", "under"]
