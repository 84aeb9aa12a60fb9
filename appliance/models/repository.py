"""The model repository: ``<data_dir>`` on disk and its state in SQLite (DESIGN section 3).

Knows rows, files and versions; nothing of sockets or sessions. A version directory is
written under staging/, fsynced, then renamed into models/<name>/<version>/ and never
modified again; the active pointer changes in one SQLite transaction.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from appliance.config.schema import BatchingConfig
from appliance.errors import ConfigError, FailedPrecondition, InvalidArgument, NotFound
from appliance.models.model_config import (
    ModelConfig,
    complete,
    load_model_config,
    model_config_to_toml,
)
from engines.base import file_sha256
from engines.files import copy_synced, fsync_dir, write_synced

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.toml"
SAMPLES_FILE = "samples.npz"
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


@dataclass(frozen=True)
class VersionRecord:
    model: str
    version: int
    state: str  # ready | bad
    path: Path
    sha256: str
    created_at: float

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    def config(self) -> ModelConfig:
        return load_model_config(self.path / CONFIG_FILE)


@dataclass(frozen=True)
class ModelRecord:
    name: str
    active_version: int | None
    versions: tuple[VersionRecord, ...]


def check_model_name(name: str) -> None:
    if not name or len(name) > 128 or not set(name) <= _NAME_OK or name[0] in ".-":
        raise InvalidArgument(
            f"model name {name!r} must be 1-128 letters, digits, '_', '-' or '.', "
            f"not starting with '.' or '-'"
        )


class Repository:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.models_dir = self.data_dir / "models"
        self.engines_dir = self.data_dir / "engines"
        self.staging_dir = self.data_dir / "staging"
        for d in (self.models_dir, self.engines_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.db = sqlite_utils.Database(self.data_dir / "state.db")
        self.db.conn.execute("PRAGMA busy_timeout = 10000")
        self.db.enable_wal()
        self._create_schema()

    def _create_schema(self) -> None:
        with self.db.conn:
            self.db["models"].create(
                {"name": str, "active_version": int, "created_at": float},
                pk="name", if_not_exists=True,
            )
            self.db["versions"].create(
                {"model": str, "version": int, "state": str, "path": str, "sha256": str,
                 "created_at": float},
                pk=("model", "version"), if_not_exists=True,
            )
            self.db["traffic"].create({"model": str, "policy": str}, pk="model",
                                      if_not_exists=True)
            # The layout each version last ran with here (models/layout.py), for the
            # commands that show it without a server.
            self.db["layouts"].create({"model": str, "version": int, "layout": str,
                                       "ts": float}, pk=("model", "version"),
                                      if_not_exists=True)
            self.db["events"].create(
                {"id": int, "ts": float, "model": str, "version": int, "kind": str,
                 "detail": str},
                pk="id", if_not_exists=True,
            )

    def close(self) -> None:
        self.db.conn.close()

    # -- reads ---------------------------------------------------------------------------

    def _version(self, row: dict) -> VersionRecord:
        return VersionRecord(row["model"], row["version"], row["state"], Path(row["path"]),
                             row["sha256"], row["created_at"])

    def _record(self, row: dict) -> ModelRecord:
        versions = tuple(self._version(r) for r in self.db.query(
            "select * from versions where model = ? order by version", [row["name"]]))
        return ModelRecord(row["name"], row["active_version"], versions)

    def models(self) -> list[ModelRecord]:
        return [self._record(m) for m in self.db.query("select * from models order by name")]

    def model(self, name: str) -> ModelRecord:
        for row in self.db.query("select * from models where name = ?", [name]):
            return self._record(row)
        raise NotFound(f"model '{name}' is not in the repository at {self.data_dir}; "
                       f"'outpost models list' shows what is")

    def version(self, name: str, version: int) -> VersionRecord:
        rows = list(self.db.query(
            "select * from versions where model = ? and version = ?", [name, version]))
        if not rows:
            self.model(name)  # NOT_FOUND for the model first
            raise NotFound(f"model '{name}' has no version {version}")
        return self._version(rows[0])

    # -- writes --------------------------------------------------------------------------

    def add(
        self,
        name: str,
        model_path: Path,
        *,
        version: int | None = None,
        config_path: Path | None = None,
        samples_path: Path | None = None,
        defaults: BatchingConfig | None = None,
        activate: bool = True,
        adopt: bool = False,
    ) -> VersionRecord:
        """Check, complete and store a new immutable version; returns its record.

        ``model_path`` is an ONNX model, or an ensemble's config.toml (no model file).
        With ``activate=False`` the version is only staged, even the first of a model:
        nothing serves it until it is activated (the updater validates it first).
        With ``adopt=True`` the files are moved in, not copied (a rename where they are
        on this filesystem): the caller gives them up, and the disk holds one copy.
        """
        check_model_name(name)
        model_path = Path(model_path)
        if not model_path.is_file():
            raise InvalidArgument(f"{model_path}: no such model file")
        files: dict[str, Path] = {}
        if model_path.suffix == ".toml":
            config = load_model_config(model_path)
            if config.ensemble is None:
                raise InvalidArgument(f"{model_path}: a .toml given as the model must declare "
                                      f"an [ensemble]; for an ONNX model pass the .onnx file")
            if config_path is not None:
                raise InvalidArgument("an ensemble's config is its model file; drop --config")
        else:
            external = check_onnx(model_path)
            config = complete(load_model_config(config_path), model_path,
                              defaults or BatchingConfig(),
                              str(config_path or model_path))
            if config.ensemble is not None:
                raise InvalidArgument(f"{config_path}: [ensemble] belongs in an ensemble's "
                                      f"own config, not beside an ONNX model")
            files[MODEL_FILE] = model_path
            files.update({rel: model_path.parent / rel for rel in external})
        if samples_path is not None:
            files[SAMPLES_FILE] = Path(samples_path)
        version = self._new_version_number(name, version)
        final = self.models_dir / name / str(version)
        stage = self.staging_dir / "repo" / f"{name}-{version}-{uuid.uuid4().hex[:8]}"
        try:
            stage.mkdir(parents=True)
            for rel, src in files.items():
                dst = stage / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if adopt:
                    _move_synced(src, dst)
                else:
                    copy_synced(src, dst)
            write_synced(stage / CONFIG_FILE, model_config_to_toml(config).encode())
            fsync_dir(stage)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(stage, final)
            fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        digest_of = final / (MODEL_FILE if MODEL_FILE in files else CONFIG_FILE)
        record = VersionRecord(name, version, "ready", final, file_sha256(digest_of),
                               time.time())
        with self.db.conn:
            self.db["models"].insert(
                {"name": name, "active_version": None, "created_at": record.created_at},
                ignore=True,
            )
            self.db["versions"].insert({
                "model": name, "version": version, "state": record.state,
                "path": str(final), "sha256": record.sha256, "created_at": record.created_at,
            })
            if activate:
                self.db["models"].update(name, {"active_version": version})
            self._event(name, version, "added", str(model_path))
        return record

    def _new_version_number(self, name: str, version: int | None) -> int:
        if version is None:
            row = list(self.db.query(
                "select max(version) as v from versions where model = ?", [name]))
            version = (row[0]["v"] or 0) + 1
        if version < 1:
            raise InvalidArgument(f"version {version} must be a positive integer")
        if (self.models_dir / name / str(version)).exists() or list(self.db.query(
                "select 1 from versions where model = ? and version = ?", [name, version])):
            raise FailedPrecondition(
                f"model '{name}' already has version {version}; versions are immutable: "
                f"add it under a new version number"
            )
        return version

    def set_active(self, name: str, version: int) -> None:
        record = self.version(name, version)
        if record.state != "ready":
            raise FailedPrecondition(
                f"model '{name}' version {version} is marked {record.state}; it can't be active"
            )
        with self.db.conn:
            self.db["models"].update(name, {"active_version": version})
            self._event(name, version, "activated", "")

    def record_layout(self, name: str, version: int, layout: dict) -> None:
        with self.db.conn:
            self.db["layouts"].upsert({"model": name, "version": version,
                                       "layout": json.dumps(layout), "ts": time.time()},
                                      pk=("model", "version"))

    def layouts(self) -> dict[tuple[str, int], dict]:
        """(model, version) -> the layout it last ran with here."""
        return {(r["model"], r["version"]): json.loads(r["layout"])
                for r in self.db.query("select * from layouts")}

    def traffic(self, name: str) -> dict | None:
        """The traffic policy set at run time for ``name`` (None: the config's)."""
        rows = list(self.db.query("select policy from traffic where model = ?", [name]))
        return json.loads(rows[0]["policy"]) if rows else None

    def set_traffic(self, name: str, policy: dict | None) -> None:
        self.model(name)
        with self.db.conn:
            if policy is None:
                self.db.execute("delete from traffic where model = ?", [name])
            else:
                self.db["traffic"].upsert({"model": name, "policy": json.dumps(policy)},
                                          pk="model")
            self._event(name, None, "traffic", json.dumps(policy))

    def mark(self, name: str, version: int, state: str, detail: str = "") -> None:
        self.version(name, version)
        with self.db.conn:
            self.db.execute(
                "update versions set state = ? where model = ? and version = ?",
                [state, name, version])
            self._event(name, version, f"marked-{state}", detail)

    def remove(self, name: str, version: int | None = None) -> list[int]:
        """Remove one version (not the active one) or the whole model; returns versions gone."""
        model = self.model(name)
        if version is not None:
            self.version(name, version)
            if version == model.active_version and len(model.versions) > 1:
                raise FailedPrecondition(
                    f"version {version} of '{name}' is active; activate another version "
                    f"first, or remove the whole model"
                )
            gone = [version]
        else:
            gone = [v.version for v in model.versions]
        trash = self.staging_dir / "trash" / uuid.uuid4().hex[:8]
        trash.mkdir(parents=True)
        with self.db.conn:
            for v in gone:
                self.db.execute("delete from versions where model = ? and version = ?",
                                [name, v])
                self._event(name, v, "removed", "")
            for v in gone:
                self.db.execute("delete from layouts where model = ? and version = ?",
                                [name, v])
            if version is None or len(model.versions) == 1:
                self.db.execute("delete from models where name = ?", [name])
                self.db.execute("delete from traffic where model = ?", [name])
        # The rows are gone first: a crash here leaves only unreferenced files in staging.
        for v in gone:
            src = self.models_dir / name / str(v)
            if src.exists():
                os.rename(src, trash / str(v))
        shutil.rmtree(trash, ignore_errors=True)
        if version is None or len(model.versions) == 1:
            shutil.rmtree(self.models_dir / name, ignore_errors=True)
        return gone

    def _event(self, model: str, version: int | None, kind: str, detail: str) -> None:
        self.db["events"].insert(
            {"ts": time.time(), "model": model, "version": version, "kind": kind,
             "detail": detail})

    def clean_staging(self) -> None:
        """Drop what a killed `add` or `remove` left in staging/ (nothing refers to it).

        Only the repository's own folders: the updater keeps partial downloads beside them.
        """
        cutoff = time.time() - 3600  # an `add` running now in another process is younger
        for sub in ("repo", "trash"):
            folder = self.staging_dir / sub
            for p in folder.iterdir() if folder.is_dir() else ():
                if p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)


def _move_synced(src: Path, dst: Path) -> None:
    """Rename ``src`` (written and fsynced by its owner) to ``dst``; copy across filesystems."""
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        copy_synced(src, dst)
        src.unlink()


def check_onnx(path: Path) -> list[str]:
    """onnx.checker on the file; returns external-data paths (each inside its directory)."""
    import onnx  # noqa: PLC0415

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InvalidArgument(f"{path}: not an ONNX model ({exc.__class__.__name__}: {exc})"
                              ) from exc
    external = sorted(_external_locations(model))
    base = path.parent.resolve()
    for rel in external:
        target = (base / rel).resolve()
        if os.path.isabs(rel) or not target.is_relative_to(base):
            raise InvalidArgument(
                f"{path}: external data location {rel!r} points outside the model's directory "
                f"{base}; keep the data files beside the model"
            )
        if not target.is_file():
            raise InvalidArgument(f"{path}: external data file {rel!r} is missing")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise InvalidArgument(f"{path}: onnx.checker refused the model: {exc}") from exc
    return external


def _external_locations(model) -> set[str]:
    import onnx  # noqa: PLC0415

    found: set[str] = set()

    def tensor(t) -> None:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    found.add(entry.value)

    def graph(g) -> None:
        for t in g.initializer:
            tensor(t)
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    tensor(attr.t)
                for t in attr.tensors:
                    tensor(t)
                if attr.HasField("g"):
                    graph(attr.g)
                for sub in attr.graphs:
                    graph(sub)

    graph(model.graph)
    return found


__all__ = ["ConfigError", "ModelRecord", "Repository", "VersionRecord", "check_onnx"]
