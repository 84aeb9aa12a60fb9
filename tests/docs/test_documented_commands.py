"""Every `outpost ...` command that README.md and docs/*.md show runs as written.

The commands come from the docs themselves: the shell code blocks (```sh, ```console,
untagged ``` blocks, and the 4-space indented blocks README uses), continuation lines
joined, comments dropped, `a && b` and `a; b` split, `sudo [-u USER]` dropped (they run as
this user), `[optional parts]` opened (each command runs with all its options). A program
named `outpost` or `.../outpost` (`.venv/bin/outpost`, `dist/outpost/outpost`) is this
checkout's `python -m appliance`.

Each doc is one scenario in a fresh folder, the working folder of its commands (the
relative files a doc names are made there under those names: FILES), with its own data dir
($OUTPOST_DATA_DIR, the socket in it). Its commands run in the order the doc shows them:
each must exit 0 with no traceback. `outpost serve` and `outpost fleet serve` are started,
asked whether they answer, and kept running for the commands after them (a later one of
the same kind replaces them), then stopped with SIGTERM: exit 0, no traceback in the log.
Placeholders that can't be files in that folder (absolute paths, ports, NAME) are mapped by
PLACEHOLDERS; a command that names an absolute path no table maps fails here, unrun.

The few that can't run here are listed with why: NOT_RUNNABLE (they must still parse) and
EXPECTED_FAILURE (they must fail in one clear line). After the first run of each command,
one bad argument (BAD: a missing file, an unknown model ...) must get one clear line on
stderr, no traceback, and must leave the repository as it was.

Inline mentions in the prose (`outpost models add NAME ensemble.toml`) must parse with the
real argument parser (a flag or subcommand that doesn't exist fails; arguments left out are
fine); those in INLINE_RUNS also run, in their place in the doc's order.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.support.updater_support import free_port

ROOT = Path(__file__).resolve().parent.parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"", "sh", "shell", "bash", "console"}
GROUPS = {"models", "fleet", "config", "profiles", "update"}  # two-word commands
SERVERS = {"serve", "fleet serve"}  # run until SIGTERM


def _doc_name(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- what can't run here, and why ----------------------------------------------------------

_LIVE_INSTALL = ("installs onto this system as root (/opt/outpost, /usr/local/bin, /etc, a "
                 "system user, systemctl daemon-reload); tests/cli/test_install.py runs it "
                 "into a folder with --root")
NOT_RUNNABLE = {  # the command as the doc shows it -> why (it must still parse)
    "sudo ./outpost install": _LIVE_INSTALL,
    "sudo /tmp/outpost-new/outpost install": _LIVE_INSTALL,
    "sudo outpost-0.1.0-linux-aarch64/outpost install --enable": _LIVE_INSTALL,
}
EXPECTED_FAILURE = {  # -> why; it must fail with one line, no traceback
    "outpost compile model.onnx --profile jetson-orin-nano-8gb -o model.plan":
        "builds a TensorRT plan on an NVIDIA GPU: where TensorRT or the GPU is missing it "
        "must say so in one line (where both are present it must build)",
}
ADAPT = {  # -> (arguments added, why)
    ".venv/bin/outpost demo": (["--seconds", "0.2"],
                               "its default 2 s of load per model and concurrency would take "
                               "14 s of this test; the rest runs as written"),
}

# -- what the docs' placeholders stand for ---------------------------------------------------

PLACEHOLDERS = {
    "/srv/fleet": "{tmp}/srv/fleet",
    "/srv/www": "{tmp}/srv/www",  # `fleet sync`'s DEST: the folder a static server serves
    "R.pem": "{tmp}/srv/fleet/keys/root.pem",  # the root key `fleet init` wrote
    "/media/offline/root.pem": "{tmp}/offline/root.pem",
    "/media/offline/root-2026.pem": "{tmp}/offline/root-2026.pem",
    "/etc/outpost/config.toml": "{tmp}/etc/outpost/config.toml",  # data_dir: the scenario's
    "/tmp/outpost-try": "{tmp}/outpost-try",
    "127.0.0.1:8000": "127.0.0.1:{http_port}",
    "8700": "{fleet_port}",
    "8470": "{fleet_port}",
    "0.0.0.0": "127.0.0.1",  # a test listens on loopback only
    "NAME": "mymodel",
    "VERSION": "1",
    "FILE": "{tmp}/device.toml",  # `update check --config FILE`: a device's config (below)
}
INLINE_RUNS = {  # inline mentions that are whole commands, run in their place
    ("docs/versions.md", "outpost models add NAME ensemble.toml"),
    ("docs/ota.md", "outpost update check [--config FILE]"),
}
VARIANTS = {  # a command run once per variant: placeholder values (and what the hooks use)
    ("docs/versions.md", "outpost models add NAME ensemble.toml"): [
        {"NAME": "pipeline", "ensemble.toml": "pipeline.toml", "input": "image=raw.npy",
         "classes": 4},
        {"NAME": "combiner", "ensemble.toml": "combine.toml", "input": "features=features.npy",
         "classes": 3},
    ],
}
ENV = {  # extra environment of a command
    ("README.md", "outpost update check"): {"OUTPOST_CONFIG": "{tmp}/device.toml"},
}


# -- the docs' commands ----------------------------------------------------------------------

@dataclass(frozen=True)
class DocCommand:
    doc: str
    line: int
    text: str  # as the doc shows it: continuations joined, comment dropped
    args: tuple[str, ...]  # after the program, brackets opened
    env: tuple[tuple[str, str], ...] = ()
    sudo: bool = False
    inline: bool = False

    @property
    def key(self) -> str:
        """The command itself: `models add`, `serve`, `fleet serve`, ..."""
        if self.args and self.args[0] in GROUPS and len(self.args) > 1:
            return " ".join(self.args[:2])
        return self.args[0] if self.args else ""


_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*")
_MENTIONS_OUTPOST = re.compile(r"(^|[\s;&|])([\w./-]*/)?outpost\s+[a-z]")


def _is_outpost(program: str) -> bool:
    return program == "outpost" or program.endswith("/outpost")


def _commands_in(text: str, doc: str, line: int, inline: bool) -> list[DocCommand]:
    lex = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError as exc:  # unbalanced quotes: not a shell line, unless it runs outpost
        assert not _MENTIONS_OUTPOST.search(text), f"{doc}:{line}: can't parse {text!r}: {exc}"
        return []
    out, segment = [], []
    for token in [*tokens, ";"]:
        if token and set(token) <= set(";&|"):
            out.extend(_command(segment, doc, line, inline))
            segment = []
        else:
            segment.append(token)
    return out


def _command(tokens: list[str], doc: str, line: int, inline: bool) -> list[DocCommand]:
    text = " ".join(tokens)
    i, sudo, env = 0, False, []
    if tokens[:1] == ["sudo"]:
        sudo, i = True, 1
        while i < len(tokens) and tokens[i].startswith("-"):
            i += 2 if tokens[i] in ("-u", "-g") else 1
    while i < len(tokens) and _ASSIGNMENT.fullmatch(tokens[i]):
        env.append(tuple(tokens[i].split("=", 1)))
        i += 1
    if i >= len(tokens) or not _is_outpost(tokens[i]):
        return []
    first = tokens[i + 1] if i + 1 < len(tokens) else ""
    if inline and not re.fullmatch(r"(--?)?[a-z][a-z-]*", first):
        return []  # a path in prose (`/usr/local/bin/outpost -> ...`), not a command
    opened = (t.lstrip("[").rstrip("]") for t in tokens[i + 1:])  # [optional] parts
    args = [t for t in opened if t and t != "..."]
    return [DocCommand(doc, line, text, tuple(args), tuple(env), sudo, inline)]


def _shell_lines(lines: list[str]):
    """(line number, code line) of the shell code: fenced blocks (```sh, untagged ...) and
    indented blocks outside fences; backslash continuations joined, a `$ ` prompt dropped
    (in a ```console block only the lines with one are commands: the rest is output)."""
    fence, indented, prev_blank, pending, start = None, False, True, "", 0
    for n, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            indented = False
            continue
        if fence is not None:
            code = fence in SHELL_FENCES
        else:
            code = bool(stripped) and line.startswith("    ") and (prev_blank or indented)
            indented = code or (indented and not stripped)
        prev_blank = not stripped
        if fence == "console" and not pending:
            code = stripped.startswith("$ ")
        if not code:
            continue
        if not pending:
            start = n
            stripped = stripped.removeprefix("$ ")
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        yield start, pending + stripped
        pending = ""


def _inline_spans(lines: list[str]):
    """(line number, span) of the `code spans` in prose (not in code blocks)."""
    fence = None
    for n, line in enumerate(lines, 1):
        if line.strip().startswith("```"):
            fence = None if fence is not None else line
            continue
        if fence is None and not line.startswith("    "):
            yield from ((n, m.group(1)) for m in re.finditer(r"`([^`\n]+)`", line))


def doc_commands() -> list[DocCommand]:
    found = []
    for path in DOCS:
        doc, lines = _doc_name(path), path.read_text().splitlines()
        for n, text in _shell_lines(lines):
            found.extend(_commands_in(text, doc, n, inline=False))
        for n, span in _inline_spans(lines):
            found.extend(_commands_in(span, doc, n, inline=True))
    return found


COMMANDS = doc_commands()


def _to_run(doc: str) -> list[DocCommand]:
    return sorted((c for c in COMMANDS if c.doc == doc
                   and (not c.inline or (c.doc, c.text) in INLINE_RUNS)),
                  key=lambda c: c.line)


# -- the files the docs name -----------------------------------------------------------------

def _toml_blocks(doc: str) -> list[str]:
    return re.findall(r"^```toml\n(.*?)^```", (ROOT / doc).read_text(), re.M | re.S)


def _save(path: Path, nodes, inputs, outputs, inits=()) -> Path:
    from onnx import helper

    from appliance.demo.models import save_model

    return save_model(helper.make_graph(nodes, path.stem, inputs, outputs,
                                        initializer=list(inits)), path)


def _renamed_identity(path: Path, name_in: str, name_out: str, width: int = 16) -> Path:
    """y = x + 1 with the tensor names a pipeline step maps (preprocess: raw -> tensor)."""
    from onnx import TensorProto, helper, numpy_helper

    one = numpy_helper.from_array(np.ones(width, np.float32), "one")
    return _save(path, [helper.make_node("Add", [name_in, "one"], [name_out])],
                 [helper.make_tensor_value_info(name_in, TensorProto.FLOAT, ["n", width])],
                 [helper.make_tensor_value_info(name_out, TensorProto.FLOAT, ["n", width])],
                 [one])


def _classifier(path: Path, seed: int, classes: int = 4, width: int = 16) -> Path:
    """probs = softmax(input @ W)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((width, classes)).astype(np.float32)
    return _save(path, [helper.make_node("MatMul", ["input", "w"], ["logits"]),
                        helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
                 [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", width])],
                 [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", classes])],
                 [numpy_helper.from_array(w, "w")])


def make_files(tmp: Path, data: Path) -> None:
    """The files the docs' commands name, under the names they use."""
    from appliance.demo.models import cnn_model, identity_model, mlp_model

    (tmp / "path" / "to").mkdir(parents=True)
    cnn_model(tmp / "path" / "to" / "model.onnx")  # `resnet`: an image classifier
    cnn_model(tmp / "new.onnx", seed=8)
    np.save(tmp / "cat.npy", np.zeros((1, 3, 224, 224), np.float32))
    [model_config] = [b for b in _toml_blocks("README.md") if "[dynamic_batching]" in b]
    (tmp / "config.toml").write_text(model_config)  # README's model config, as written
    identity_model(tmp / "model.onnx")
    np.savez(tmp / "samples.npz", **{"inputs/x": np.ones((4, 16), np.float32)})
    for block in _toml_blocks("docs/versions.md"):  # the ensembles, as written
        if 'kind = "pipeline"' in block:
            (tmp / "pipeline.toml").write_text(block)
        elif 'kind = "combine"' in block:
            (tmp / "combine.toml").write_text(block)
    np.save(tmp / "raw.npy", np.zeros((2, 16), np.float32))
    np.save(tmp / "features.npy", np.ones((2, 32), np.float32))
    # Members of the ensembles (added by the versions.md scenario's setup).
    members = tmp / "members"
    _renamed_identity(members / "preprocess.onnx", "raw", "tensor")
    mlp_model(members / "a.onnx", seed=1)
    mlp_model(members / "b.onnx", seed=2)
    # For the bad arguments.
    (tmp / "broken-ensemble.toml").write_text('[ensemble]\nkind = "pipeline"\n')  # no steps
    (tmp / "tensorrt.toml").write_text('engine = "tensorrt"\n')
    (tmp / "not-a-folder").write_text("a file\n")
    (tmp / "bad-profiles").mkdir()
    (tmp / "bad-profiles" / "x86-cpu.toml").write_text("bogus = 1\n")
    (tmp / "offline").mkdir()
    (tmp / "etc" / "outpost").mkdir(parents=True)
    (tmp / "etc" / "outpost" / "config.toml").write_text(f'data_dir = "{data}"\n')


# -- a running scenario ----------------------------------------------------------------------

@dataclass
class Server:
    kind: str
    argv: list[str]
    proc: subprocess.Popen
    log: Path
    url: str = ""


@dataclass
class Scenario:
    doc: str
    tmp: Path
    servers: dict[str, Server] = field(default_factory=dict)
    stopped: list[tuple[Server, int]] = field(default_factory=list)

    def __post_init__(self):
        self.data = self.tmp / "data"
        self.values = {"tmp": str(self.tmp), "http_port": free_port(),
                       "fleet_port": free_port()}
        env = {k: v for k, v in os.environ.items()
               if k not in ("OUTPOST_SOCKET", "OUTPOST_CONFIG", "OUTPOST_TOKEN")}
        assert env.get("OUTPOST_PROFILES_DIR"), "tests/conftest.py sets the test profiles"
        env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [
            os.environ.get("PYTHONPATH")])]), OUTPOST_DATA_DIR=str(self.data),
            XDG_RUNTIME_DIR="")  # the socket: <data dir>/outpost.sock
        self.env = env
        make_files(self.tmp, self.data)

    # placeholders
    def map(self, token: str, variant: dict) -> str:
        table = {**PLACEHOLDERS, **{k: v for k, v in variant.items() if isinstance(v, str)}}
        if token in table:
            return table[token].format(**self.values)
        key, sep, value = token.partition("=")
        if sep and value in table:
            return f"{key}={table[value].format(**self.values)}"
        return token

    def argv(self, args, variant: dict | None = None) -> list[str]:
        out = [self.map(a, variant or {}) for a in args]
        for a in out:
            self.check_path(a)
        return out

    def check_path(self, token: str) -> None:
        for value in (token, token.partition("=")[2]):
            if value.startswith("/") and not value.startswith(str(self.tmp)):
                pytest.fail(f"{self.doc}: {value!r} is outside the scenario folder; map it "
                            f"in PLACEHOLDERS (nothing here may touch the host's files)")

    # running
    def run(self, argv: list[str], env: dict | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "appliance", *argv], cwd=self.tmp,
                              env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def ok(self, argv: list[str], env: dict | None = None,
           what: str = "") -> subprocess.CompletedProcess:
        r = self.run(argv, env)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (
            f"{what or 'outpost ' + shlex.join(argv)} exited {r.returncode}:\n"
            f"{r.stderr[-3000:]}")
        return r

    def start(self, kind: str, argv: list[str], what: str) -> Server:
        if kind in self.servers:
            self.stop(kind)
        log = self.tmp / f"{kind.replace(' ', '-')}-{len(self.stopped)}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "appliance", *argv], cwd=self.tmp,
                                    env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        server = self.servers[kind] = Server(kind, argv, proc, log)
        if kind == "serve":
            ready = self._wait(server, what, _ready_line)
            from appliance.client import Client

            with Client(ready["socket"], timeout_s=10) as c:
                c.health()  # it answers on its socket
            if ready.get("http"):
                server.url = ready["http"]
                with urllib.request.urlopen(f"{server.url}/v2/health/live", timeout=10) as r:
                    assert r.status == 200
            if "--demo" in argv:
                assert {"identity:1", "cnn:1", "mlp:1"} <= set(ready["models"]), ready
            assert ready["ready"] is True, f"{what}: not every model loaded: {ready}"
        else:
            server.url = self._wait(server, what, _fleet_line)
            with urllib.request.urlopen(f"{server.url}/v1/status", timeout=10) as r:
                assert r.status == 200 and isinstance(json.loads(r.read()), list)
        return server

    def _wait(self, server: Server, what: str, find, timeout_s: float = 60):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = server.log.read_text(errors="replace")
            found = find(text)
            if found:
                return found
            if server.proc.poll() is not None:
                pytest.fail(f"{what} exited {server.proc.returncode} before it answered:\n"
                            f"{text[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"{what} did not answer within {timeout_s} s:\n{text[-3000:]}")

    def stop(self, kind: str) -> None:
        server = self.servers.pop(kind)
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
        self.stopped.append((server, server.proc.returncode))

    def close(self) -> list[str]:
        for kind in list(self.servers):
            self.stop(kind)
        problems = []
        for server, code in self.stopped:
            log = server.log.read_text(errors="replace")
            if code != 0 or "Traceback" in log:
                problems.append(f"outpost {shlex.join(server.argv)}: SIGTERM -> exit {code}"
                                f"\n{log[-3000:]}")
        return problems


def _ready_line(text: str) -> dict | None:
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("msg") == "ready":
            return record
    return None


def _fleet_line(text: str) -> str | None:
    m = re.search(r"^fleet server on (http://[^/\s]+)/", text, re.M)
    return m.group(1) if m else None


def _repository(data: Path) -> list[tuple]:
    """Every stored version and each model's active one: what a failed command must leave."""
    if not (data / "state.db").exists():
        return []
    with contextlib.closing(sqlite3.connect(data / "state.db")) as db:
        return [*db.execute("select model, version, state from versions order by 1, 2"),
                *db.execute("select name, active_version from models order by 1")]


def _one_clear_line(r: subprocess.CompletedProcess, what: str) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0, f"{what}: exit 0:\n{r.stdout[-2000:]}"
    assert "Traceback" not in r.stderr, f"{what}: a traceback:\n{r.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("outpost"), (
        f"{what}: not one clear line:\n{r.stderr[-3000:]}")
    return lines[0]


def _tensorrt_usable() -> bool:
    from engines.tensorrt import probe

    return probe()[0]


# -- hooks: what the docs take for granted ---------------------------------------------------

def _device_config(device_id: str, labels: str = ""):
    """The device's appliance config with an [updater] table (docs/ota.md, "Device guide")
    pointing at the fleet server the doc started, with the key `fleet device-key` wrote."""
    def write(s: Scenario, _variant) -> None:
        fleet = s.servers.get("fleet serve")
        assert fleet is not None, f"{s.doc}: `outpost update check` needs the fleet served"
        (s.tmp / "device.toml").write_text(
            f'data_dir = "{s.data}"\n[updater]\nfleet_url = "{fleet.url}"\n'
            f'trusted_root = "{s.tmp}/srv/fleet/metadata/1.root.json"\n'
            f'device_id = "{device_id}"\nreport_key_file = "{s.tmp}/{device_id}.key"\n'
            f'health_window_s = 0.5\n[updater.labels]\n{labels}')
    return write


def _third_version(s: Scenario, _variant) -> None:
    """README's `--shadow 3` needs a version 3 (staged: the split keeps serving 1 and 2)."""
    s.ok(["models", "add", "resnet", "path/to/model.onnx", "--stage"])


def _ensemble_answers(s: Scenario, variant: dict) -> None:
    """The ensemble just added loads in the running server and answers through it."""
    name = variant["NAME"]
    s.ok(["models", "load", name])
    r = s.ok(["infer", name, "--input", variant["input"], "--json"])
    probs = np.array(json.loads(r.stdout)["outputs"]["probs"])
    assert probs.shape == (2, variant["classes"])
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)


def _versions_setup(s: Scenario) -> None:
    """docs/versions.md talks to a running server holding `m` (1 active, 2 and 3 staged)
    and, for its ensembles, their members (classifier version 3 pinned)."""
    from appliance.models.repository import Repository

    repo = Repository(s.data)
    try:
        for version in (1, 2, 3):
            repo.add("m", s.tmp / "model.onnx", activate=version == 1)
        repo.add("preprocess", s.tmp / "members" / "preprocess.onnx")
        for seed in (1, 2, 3):
            repo.add("classifier", _classifier(s.tmp / "members" / f"c{seed}.onnx", seed))
        repo.add("a", s.tmp / "members" / "a.onnx")
        repo.add("b", s.tmp / "members" / "b.onnx")
    finally:
        repo.close()
    s.start("serve", ["serve"], "docs/versions.md's server")


SETUP = {"docs/versions.md": _versions_setup}
BEFORE = {  # (doc, command) -> done first
    ("README.md", "outpost models traffic resnet --shadow 3"): [_third_version],
    ("README.md", "outpost update check"): [_device_config("cam07")],
    ("docs/ota.md", "outpost update check [--config FILE]"):
        [_device_config("line3-cam07", 'site = "berlin"\n')],
    ("docs/ota.md", "outpost fleet sync /srv/fleet /srv/www [--prune]"):  # the doc's mkdir
        [lambda s, _variant: (s.tmp / "srv" / "www").mkdir(parents=True, exist_ok=True)],
}
AFTER = {  # (doc, command) -> checked right after
    ("docs/versions.md", "outpost models add NAME ensemble.toml"): [_ensemble_answers],
}

# -- one bad argument per command -------------------------------------------------------------

_NO_FLEET = "not a fleet repository"
BAD = {  # command -> [(arguments with one bad one, words its one line must hold[, env])]
    "serve": [(["serve", "--config", "missing.toml"], "no such file"),
              (["serve", "--http", "localhost"], "HOST:PORT")],
    "demo": [(["demo", "--data-dir", "not-a-folder/x"], "Not a directory")],
    "models add": [(["models", "add", "resnet", "missing.onnx"], "no such model file"),
                   (["models", "add", "broken", "broken-ensemble.toml"], "ensemble"),
                   (["models", "add", "resnet", "new.onnx", "--samples", "missing.npz"],
                    "no such file")],
    "models list": [(["models", "list", "--data-dir", "not-a-folder/x"], "Not a directory")],
    "models activate": [(["models", "activate", "nosuchmodel", "1"], "NOT_FOUND")],
    "models traffic": [(["models", "traffic", "nosuchmodel"], "NOT_FOUND"),
                       (["models", "traffic", "resnet", "--split", "1=ninety"], "--split")],
    "infer": [(["infer", "nosuchmodel", "--input", "image=cat.npy"], "NOT_FOUND"),
              (["infer", "resnet", "--input", "image=missing.npy"], "can't read"),
              (["infer", "resnet", "--input", "image=samples.npz"], ".npz")],
    "config show": [(["config", "show", "--config", "missing.toml"], "no such file")],
    "info": [(["info", "--profile", "nosuchprofile"], "unknown firmware profile")],
    "profiles list": [(["profiles", "list"], "unknown key 'bogus'",
                       {"OUTPOST_PROFILES_DIR": "{tmp}/bad-profiles"})],
    "profiles show": [(["profiles", "show", "nosuchprofile"], "unknown firmware profile")],
    "profiles detect": [(["profiles", "detect", "--device-tree", "missing"], "no such file")],
    "compile": [(["compile", "missing.onnx", "--profile", "jetson-orin-nano-8gb"],
                 "no such model file")],
    "install": [(["install", "--dry-run", "--root", "{tmp}/root", "--from", "missing"],
                 "no 'outpost' executable")],
    "fleet init": [(["fleet", "init", "/srv/fleet"], "already holds a fleet repository")],
    "fleet publish": [(["fleet", "publish", "/srv/fleet", "missing.onnx", "--name", "detector",
                        "--version", "99"], "no such model file")],
    "fleet rollout": [(["fleet", "rollout", "/srv/fleet", "nosuchmodel", "7", "--fraction",
                        "0.1"], "no release nosuchmodel 7")],
    "fleet promote": [(["fleet", "promote", "/srv/fleet", "nosuchmodel", "7", "--fraction",
                        "1"], "no release nosuchmodel 7")],
    "fleet pause": [(["fleet", "pause", "/srv/fleet", "nosuchmodel", "7"], "no release")],
    "fleet resume": [(["fleet", "resume", "/srv/fleet", "nosuchmodel", "7"], "no release")],
    "fleet halt": [(["fleet", "halt", "/srv/fleet", "nosuchmodel", "7"], "no release")],
    "fleet status": [(["fleet", "status", "missing"], _NO_FLEET)],
    "fleet serve": [(["fleet", "serve", "missing"], _NO_FLEET)],
    "fleet sync": [(["fleet", "sync", "/srv/fleet", "missing"], "no such folder")],
    "fleet device-key": [(["fleet", "device-key", "missing", "cam07"], _NO_FLEET),
                         (["fleet", "device-key", "/srv/fleet", "cam07", "--out",
                           "not-a-folder/cam07.key"], "is not a folder")],
    "fleet rotate-key": [(["fleet", "rotate-key", "/srv/fleet", "timestamp", "--root-key",
                           "missing.pem"], "no such key file")],
    "update check": [(["update", "check", "--config", "missing.toml"], "no such file"),
                     (["update", "check", "--config", "{tmp}/etc/outpost/config.toml"],
                      "no [updater] section")],
}
if not _tensorrt_usable():  # a version added, then its engine refused: nothing stays
    BAD["models add"].append((["models", "add", "resnet", "new.onnx", "--appliance-config",
                               "tensorrt.toml"], "tensorrt"))
_BAD_DONE: set[str] = set()  # each command's bad arguments are tried once a session


def _try_bad(s: Scenario, key: str) -> None:
    if key in _BAD_DONE:
        return
    _BAD_DONE.add(key)
    assert key in BAD, f"add a bad-argument case for `outpost {key}` to BAD"
    for args, words, *extra in BAD[key]:
        argv = s.argv([a.format(**s.values) for a in args])
        env = {k: v.format(**s.values) for k, v in (extra[0] if extra else {}).items()}
        before = _repository(s.data)
        line = _one_clear_line(s.run(argv, env), f"outpost {shlex.join(argv)}")
        assert words in line, f"outpost {shlex.join(argv)}: {line!r} lacks {words!r}"
        assert _repository(s.data) == before, f"outpost {shlex.join(argv)} left changes"


# -- the tests -------------------------------------------------------------------------------

def _parse(args: list[str]) -> str:
    """'' when the real parser takes ``args``, else its complaint."""
    from appliance.cli.main import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(args)
        except SystemExit as exc:
            return err.getvalue().strip().splitlines()[-1] if exc.code else ""
    return ""


def test_the_docs_show_the_commands_this_test_expects():
    by_doc = {d: [c for c in COMMANDS if c.doc == d and not c.inline] for d in
              map(_doc_name, DOCS)}
    assert len(by_doc["README.md"]) >= 20, by_doc["README.md"]  # the extraction works
    assert len(by_doc["docs/ota.md"]) >= 10 and by_doc["docs/versions.md"]
    shown = {c.text for c in COMMANDS} | {(c.doc, c.text) for c in COMMANDS}
    for table in (NOT_RUNNABLE, EXPECTED_FAILURE, ADAPT, INLINE_RUNS, VARIANTS, ENV,
                  BEFORE, AFTER):
        stale = [k for k in table if k not in shown]
        assert not stale, f"the docs no longer show {stale}: update the table"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: f"{c.doc}:{c.line}")
def test_every_command_shown_parses(command):
    """Even a mention in prose names a real command with real flags (what it leaves out is
    fine there: `outpost fleet serve` in a sentence)."""
    values = {"tmp": "/tmp/x", "http_port": 8000, "fleet_port": 8470}
    complaint = _parse([PLACEHOLDERS.get(a, a).format(**values) for a in command.args])
    if command.inline and "the following arguments are required" in complaint:
        return
    assert not complaint, f"{command.doc}:{command.line}: `{command.text}`: {complaint}"


@pytest.mark.parametrize("doc", [_doc_name(d) for d in DOCS
                                 if any(c.doc == _doc_name(d) for c in COMMANDS)])
def test_documented_commands_run_as_written(doc):
    tmp = Path(tempfile.mkdtemp(prefix="op-doc-"))  # short: the socket lives in it
    s = Scenario(doc, tmp)
    problems: list[str] = []
    try:
        if doc in SETUP:
            SETUP[doc](s)
        for command in _to_run(doc):
            _run_one(s, command)
    finally:
        problems = s.close()
        shutil.rmtree(tmp, ignore_errors=True)
    assert not problems, "\n\n".join(problems)


def _run_one(s: Scenario, c: DocCommand) -> None:
    where = f"{c.doc}:{c.line}: `{c.text}`"
    if c.text in NOT_RUNNABLE:
        assert not _parse(list(c.args)), f"{where}: {_parse(list(c.args))}"
        return
    if c.key == "install" and not {"--dry-run", "--print-unit"} & set(c.args):
        pytest.fail(f"{where} would install onto this system: list it in NOT_RUNNABLE")
    for variant in VARIANTS.get((c.doc, c.text), [{}]):
        for hook in BEFORE.get((c.doc, c.text), ()):
            hook(s, variant)
        argv = s.argv([*c.args, *ADAPT.get(c.text, ((), ""))[0]], variant)
        env = {k: s.map(v, variant) for k, v in c.env}
        env.update({k: v.format(**s.values) for k, v in ENV.get((c.doc, c.text), {}).items()})
        for value in env.values():
            s.check_path(value)
        if c.key in SERVERS:
            s.start(c.key, argv, where)
        elif c.text in EXPECTED_FAILURE and not _tensorrt_usable():
            line = _one_clear_line(s.run(argv, env), where)
            assert "TensorRT" in line, f"{where}: {line}"
        else:
            s.ok(argv, env, where)
        for hook in AFTER.get((c.doc, c.text), ()):
            hook(s, variant)
        _try_bad(s, c.key)
