"""The model registry and the running node's model: import, list, activate, hot-swap.

Layout, under `<data_dir>/models/` (files, not database rows; see below):

    ACTIVE                              "name@version" of the model the node runs
    <name>/<version>/model.safetensors  state_dict; never a pickle
    <name>/<version>/model.json         sidecar: outputs, op_threshs, SHA-256s, import time
    .staging/                           half-written imports (renamed into place when complete)

Why on disk rather than in the database: an entry is the weights file plus its
metadata, written together into a staging directory and published with one
atomic rename, so there is never a row without its file or the reverse. The
CLI works on it without a database or a running node, `inference/` can read
an entry without knowing about `node/`, and the ACTIVE pointer is one small
file replaced atomically, which the running node polls (no IPC, no restart).

Versions are immutable: importing an existing NAME@VERSION is refused, and
activating another version leaves every earlier one in place for rollback.
The demo weights are an ordinary entry, `densenet121-res224-all@demo-seed0`,
flagged `demo: true` (non-clinical) in its sidecar and everywhere it is used.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.storage import fsync_dir
from inference.hashing import file_sha256

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"  # = inference.model.sidecar_path(WEIGHTS_FILE)
ACTIVE_FILE = "ACTIVE"
STAGING = ".staging"
# Name and version end up in DICOM LO values (64 chars), UIDs and paths.
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


class RegistryError(Exception):
    """A registry operation cannot be done; the message says why (shown to the operator)."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    directory: Path
    meta: dict[str, Any]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def weights(self) -> Path:
        return self.directory / WEIGHTS_FILE

    @property
    def demo(self) -> bool:
        return bool(self.meta.get("demo", False))


def parse_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition("@")
    if not sep:
        raise RegistryError(f"expected NAME@VERSION, got {ref!r}")
    check_part("name", name)
    check_part("version", version)
    return name, version


def check_part(what: str, value: str) -> None:
    if not _PART.match(value or "") or value in (".", ".."):
        raise RegistryError(
            f"model {what} {value!r} must be 1-64 characters of letters, digits and . _ + - "
            "(starting with a letter or digit)"
        )


class ModelRegistry:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @classmethod
    def for_settings(cls, settings) -> "ModelRegistry":
        return cls(Path(settings.storage.data_dir) / "models")

    # --- reading ----------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        found = []
        if not self.root.is_dir():
            return found
        for meta_path in sorted(self.root.glob(f"*/*/{META_FILE}")):
            directory = meta_path.parent
            if directory.parent.name.startswith("."):
                continue
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError) as exc:
                meta = {"problem": f"unreadable {META_FILE}: {exc}"}
            found.append(ModelEntry(directory.parent.name, directory.name, directory, meta))
        return found

    def get(self, ref: str) -> ModelEntry:
        name, version = parse_ref(ref)
        directory = self.root / name / version
        meta_path = directory / META_FILE
        if not meta_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
            known = ", ".join(e.ref for e in self.entries()) or "none"
            raise RegistryError(f"no model {ref} in {self.root} (known: {known})")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{meta_path} is unreadable: {exc}") from exc
        return ModelEntry(name, version, directory, meta)

    def active_ref(self) -> str | None:
        try:
            text = (self.root / ACTIVE_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        return text or None

    def active_pointer(self) -> tuple[str, int, int] | None:
        """(ref, mtime_ns, inode) of ACTIVE: every activation, even of the same ref, changes it."""
        path = self.root / ACTIVE_FILE
        try:
            st = path.stat()
            ref = path.read_text().strip()
        except FileNotFoundError:
            return None
        return (ref, st.st_mtime_ns, st.st_ino) if ref else None

    def verify(self, entry: ModelEntry) -> None:
        """The weights file still has the SHA-256 its sidecar recorded."""
        digest = file_sha256(entry.weights)
        if digest != entry.meta.get("sha256"):
            raise RegistryError(f"{entry.weights} has SHA-256 {digest}, its sidecar says {entry.meta.get('sha256')}; "
                                "the file is damaged: re-import it")

    # --- writing -----------------------------------------------------------------------

    def activate(self, ref: str) -> ModelEntry:
        """Point ACTIVE at `ref` (atomically). The running node picks it up on its next poll."""
        entry = self.get(ref)
        self.verify(entry)
        self._write_active(entry.ref)
        return entry

    def import_checkpoint(self, source: str | os.PathLike, *, name: str, version: str, sha256: str) -> ModelEntry:
        """Verify and convert a torchxrayvision pickle into a new, immutable entry."""
        from inference.model import WeightsError, import_xrv_checkpoint

        check_part("name", name)
        check_part("version", version)
        final = self.root / name / version
        if final.exists():
            raise RegistryError(f"{name}@{version} already exists; versions are immutable, choose a new --version")
        source = Path(source)
        if not source.is_file():
            raise RegistryError(f"{source} does not exist or is not a file")
        staging = self._staging_dir()
        try:
            import_xrv_checkpoint(source, staging / WEIGHTS_FILE, name=name, version=version, expected_sha256=sha256)
            self._publish(staging, final)
        except WeightsError as exc:
            raise RegistryError(str(exc)) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(f"{name}@{version}")

    def ensure_demo(self, seed: int = 0) -> ModelEntry:
        """The demo entry, created (seconds: BatchNorm calibration) if missing; ACTIVE set if unset."""
        from inference.model import MODEL_NAME, build_demo_state_dict, demo_version, write_weights
        from inference.types import DEMO_WARNING

        ref = f"{MODEL_NAME}@{demo_version(seed)}"
        try:
            entry = self.get(ref)
        except RegistryError:
            staging = self._staging_dir()
            try:
                meta = {
                    "name": MODEL_NAME,
                    "version": demo_version(seed),
                    "demo": True,
                    "op_threshs": [0.5] * 18,
                    "source_sha256": None,
                    "note": f"{DEMO_WARNING}: seeded initialisation with BatchNorm calibrated on synthetic phantoms",
                }
                write_weights(build_demo_state_dict(seed), meta, staging / WEIGHTS_FILE)
                self._publish(staging, self.root / MODEL_NAME / demo_version(seed))
            except FileExistsError:
                pass  # another process created it meanwhile
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            entry = self.get(ref)
        if self.active_ref() is None:
            self._write_active(entry.ref)
        return entry

    # ---------------------------------------------------------------------------------

    def _staging_dir(self) -> Path:
        base = self.root / STAGING
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=base))

    def _publish(self, staging: Path, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, final)  # atomic; fails if `final` exists and is not empty
        except OSError as exc:
            if final.exists():
                raise FileExistsError(f"{final} appeared while importing") from exc
            raise
        fsync_dir(final.parent)

    def _write_active(self, ref: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".ACTIVE.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(ref + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / ACTIVE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.root)


# --- the running node's model -----------------------------------------------------------------


class ModelManager:
    """Loads the configured model into a `BatchingEngine` and keeps it current.

    With `inference.weights` set the node is pinned to that file. Otherwise it
    runs the registry's ACTIVE model and polls the pointer every
    `inference.model_poll_seconds`; on a change it loads and warms the new
    model beside the old one (which keeps serving), then swaps it in between
    two batches. A model that fails to load is logged and the old one stays.
    """

    def __init__(self, settings, registry: ModelRegistry | None = None):
        self.settings = settings
        self.inference = settings.inference
        self.registry = registry or ModelRegistry.for_settings(settings)
        self.pinned = self.inference.weights is not None
        self.batcher = None  # inference.batcher.BatchingEngine once a model is loaded
        self.on_ready = None  # called once, with the batcher, when the first model is loaded
        self._seen_pointer: tuple | None = None  # the ACTIVE pointer last acted on (loaded or failed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- start / stop -----------------------------------------------------------------

    def start(self):
        """Load the initial model (raises if it cannot) and start watching the registry."""
        if self.pinned:
            log.info("inference.weights pins the model to %s; registry activation is ignored", self.inference.weights)
            engine = self._engine_for(self.inference.weights)
        else:
            self.registry.ensure_demo()
            self._hint_unimported_xrv_cache()
            self._seen_pointer = pointer = self.registry.active_pointer()
            engine = self._engine_for(self.registry.get(pointer[0]).weights)
        self._install(engine)
        self._start_watching()
        return self.batcher

    def start_watching_only(self) -> None:
        """After a failed start: keep polling so that activating a good model recovers the node."""
        self._start_watching()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.batcher is not None:
            self.batcher.close()

    # --- hot-swap ----------------------------------------------------------------------

    def check(self) -> bool:
        """One poll: if ACTIVE names another model, load it and swap it in. True if swapped."""
        if self.pinned:
            return False
        with self._lock:
            pointer = self.registry.active_pointer()
            if pointer is None or pointer == self._seen_pointer:
                return False
            self._seen_pointer = pointer
            ref = pointer[0]
            running = self.batcher.model_info.ref if self.batcher is not None else None
            if ref == running:
                return False
            try:
                engine = self._engine_for(self.registry.get(ref).weights)
            except Exception as exc:
                log.error("model %s was activated but cannot be loaded; still running %s: %s", ref, running, exc)
                return False
            self._install(engine)
            log.info("model switched: %s -> %s%s", running, ref,
                     f" — {engine.model_info.caveat}" if engine.model_info.demo else "")
            return True

    def _start_watching(self) -> None:
        interval = self.inference.model_poll_seconds
        if self.pinned or interval <= 0 or self._thread is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.check()
                except Exception:  # a transient filesystem error must not end the watcher
                    log.exception("model registry poll failed")

        self._thread = threading.Thread(target=loop, name="model-watcher", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------

    def _engine_for(self, weights: Path):
        from inference import InferenceEngine, SeverityBands, load_model, warm_up
        from inference.batcher import default_max_batch

        inf = self.inference
        loaded = load_model(weights, device=inf.device, cpu_threads=inf.cpu_threads)
        max_batch = inf.max_batch or default_max_batch(loaded.device.type)
        warm_up(loaded, (1, max_batch))
        return InferenceEngine(
            loaded,
            region_threshold=inf.region_threshold,
            max_batch=max_batch,
            severity_bands=SeverityBands.from_pairs(inf.severity_bands),
        )

    def _install(self, engine) -> None:
        from inference import BatchingEngine

        if self.batcher is None:
            # max_batch from the engine: the configured value, or the device's auto value.
            self.batcher = BatchingEngine(engine, max_batch=engine.max_batch, max_wait_ms=self.inference.max_wait_ms)
            if self.on_ready is not None:
                self.on_ready(self.batcher)
        else:
            self.batcher.swap(engine)

    def _hint_unimported_xrv_cache(self) -> None:
        """The xrv cache file is never unpickled by the server; tell the operator how to import it."""
        from inference.model import default_weights_path

        path = default_weights_path()
        if not path.is_file():
            return
        digest = file_sha256(path)
        if any(e.meta.get("source_sha256") == digest for e in self.registry.entries()):
            return
        log.warning(
            "torchxrayvision weights found at %s are not in the model registry and will not be loaded "
            "(run time never unpickles). Import and activate them once with: carina model import %s "
            "--name densenet121-res224-all --version <version> --sha256 <SHA-256 published for that file> --activate",
            path, path,
        )


