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

Governance (issue #13) adds, in the same layout:

    <name>/<version>/evaluations/*.json  one record per `carina eval` run (append-only)
    <name>/<version>/model.onnx[.json]   the ONNX export of the weights (derived, hash-checked)
    BACKEND                              runtime override of inference.backend (polled like ACTIVE)
    activations.jsonl                    every activation: who, when, what, forced or not

- Calibrated versions (`NAME@VERSION+calN`, never overwriting) are new entries
  whose weights file is a hard link to (or, across filesystems, a copy of) the
  parent's: the same bytes, so the same SHA-256, verified like any entry; only
  `op_threshs` and the `calibration` record behind them differ.
- Ensembles are entries with `kind: ensemble`, `members` (refs of single
  models) and their own `op_threshs`; they have no weights file.
- Fine-tuned candidates record their `parent` and a `heldout` comparison with
  it; `activate` refuses one whose held-out AUROC is below its parent's beyond
  the confidence interval on any pathology, unless forced (and the force is
  recorded). See `activation_guard`.
"""
from __future__ import annotations

import datetime as dt
import getpass
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from node.storage import fsync_dir
from inference.hashing import file_sha256

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"  # = inference.model.sidecar_path(WEIGHTS_FILE)
ACTIVE_FILE = "ACTIVE"
BACKEND_FILE = "BACKEND"
ACTIVATIONS_LOG = "activations.jsonl"
EVALUATIONS_DIR = "evaluations"
ONNX_FILE = "model.onnx"
STAGING = ".staging"
ENSEMBLE = "ensemble"
BACKENDS = ("torch", "onnxruntime")
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

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "model"))

    @property
    def is_ensemble(self) -> bool:
        return self.kind == ENSEMBLE

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(self.meta.get("members", ()))

    @property
    def onnx(self) -> Path:
        return self.directory / ONNX_FILE

    @property
    def op_thresholds(self) -> tuple[float, ...]:
        return tuple(float(t) for t in self.meta["op_threshs"])


class ActivationRefused(Exception):
    """The activation guard refused; `reasons` says per pathology why (see `activation_guard`)."""

    def __init__(self, ref: str, reasons: list[str]):
        super().__init__(f"activation of {ref} refused: " + "; ".join(reasons)
                         + ". Use --force to activate it anyway (the override is recorded).")
        self.ref = ref
        self.reasons = reasons


@dataclass(frozen=True)
class ActivationRecord:
    """One activation, as appended to `activations.jsonl` and handed to `on_activation`
    (the hook the audit trail is wired to)."""

    ref: str
    previous: str | None
    user: str
    at: str  # ISO 8601 UTC
    forced: bool
    guard: list[str] = field(default_factory=list)  # the guard's objections, overridden when forced


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


def current_user() -> str:
    """Who runs the command, for the registry's records (the OS login; no PHI)."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in a container
        return f"uid:{os.getuid()}"


def utc_now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def activation_guard(registry: "ModelRegistry", entry: ModelEntry) -> list[str]:
    """Objections to activating `entry`; [] means it may be activated.

    A fine-tuned candidate carries `heldout`: its AUROC and its parent's on the
    same held-out images, with a 95 % paired-bootstrap interval of the
    difference (candidate - parent) per pathology. The guard objects where that
    whole interval lies below zero, i.e. where the candidate is worse than its
    parent beyond the CI. Calibrated versions inherit their parent's `heldout`
    (same weights). An ensemble is checked through each of its members.
    Entries without a held-out comparison (imports, the demo) pass.
    """
    objections = []
    for checked in ([registry.get(m) for m in entry.members] if entry.is_ensemble else [entry]):
        heldout = checked.meta.get("heldout") or {}
        for label, row in sorted((heldout.get("pathologies") or {}).items()):
            delta = row.get("delta_ci")
            if not delta or delta[1] is None or not (delta[1] == delta[1]):  # missing or NaN: cannot be shown no worse
                objections.append(f"{checked.ref} {label}: no valid held-out comparison with the parent")
            elif delta[1] < 0:
                objections.append(
                    f"{checked.ref} {label}: held-out AUROC {row['candidate_auroc']:.3f} < parent "
                    f"{row['parent_auroc']:.3f} (95% CI of the difference {delta[0]:+.3f}..{delta[1]:+.3f})"
                )
    return objections


class ModelRegistry:
    def __init__(self, root: str | os.PathLike, on_activation: Callable[[ActivationRecord], None] | None = None):
        self.root = Path(root)
        # Called after every activation with its record: the hook for the node's audit trail.
        self.on_activation = on_activation

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
        if not meta_path.is_file():
            known = ", ".join(e.ref for e in self.entries()) or "none"
            raise RegistryError(f"no model {ref} in {self.root} (known: {known})")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{meta_path} is unreadable: {exc}") from exc
        entry = ModelEntry(name, version, directory, meta)
        if not entry.is_ensemble and not entry.weights.is_file():
            raise RegistryError(f"model {ref} has no weights file {entry.weights}")
        return entry

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
        """The weights file still has the SHA-256 its sidecar recorded (each member's, for an ensemble)."""
        if entry.is_ensemble:
            for member in entry.members:
                self.verify(self.get(member))
            return
        digest = file_sha256(entry.weights)
        if digest != entry.meta.get("sha256"):
            raise RegistryError(f"{entry.weights} has SHA-256 {digest}, its sidecar says {entry.meta.get('sha256')}; "
                                "the file is damaged: re-import it")

    # --- writing -----------------------------------------------------------------------

    def activate(self, ref: str, *, force: bool = False, user: str | None = None) -> ModelEntry:
        """Point ACTIVE at `ref` (atomically). The running node picks it up on its next poll.

        The activation guard runs first; its objections refuse the activation
        (ActivationRefused) unless `force`, in which case they are recorded
        with the activation. Every activation is appended to activations.jsonl
        and handed to `on_activation`."""
        entry = self.get(ref)
        self.verify(entry)
        objections = activation_guard(self, entry)
        if objections and not force:
            raise ActivationRefused(entry.ref, objections)
        previous = self.active_ref()
        self._write_active(entry.ref)
        record = ActivationRecord(ref=entry.ref, previous=previous, user=user or current_user(), at=utc_now_iso(),
                                  forced=bool(force and objections), guard=objections)
        self._append_line(self.root / ACTIVATIONS_LOG, asdict(record))
        if self.on_activation is not None:
            self.on_activation(record)
        return entry

    def activations(self) -> list[dict]:
        try:
            lines = (self.root / ACTIVATIONS_LOG).read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    # --- governance records ------------------------------------------------------------

    def record_evaluation(self, ref: str, record: dict) -> Path:
        """Append an evaluation record to the entry (never changes its weights or model.json)."""
        entry = self.get(ref)
        directory = entry.directory / EVALUATIONS_DIR
        directory.mkdir(exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = directory / f"{stamp}-{str(record.get('dataset_sha256', 'unknown'))[:12]}.json"
        _write_json_durably(path, record)
        return path

    def evaluations(self, ref: str) -> list[dict]:
        directory = self.get(ref).directory / EVALUATIONS_DIR
        return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))] if directory.is_dir() else []

    def next_version(self, name: str, base_version: str, tag: str) -> str:
        """`base_version+TAGn` with the first n not taken (`tag` is "cal" or "ft")."""
        base = re.sub(rf"\+{tag}\d+$", "", base_version)
        n = 1
        while (self.root / name / f"{base}+{tag}{n}").exists():
            n += 1
        version = f"{base}+{tag}{n}"
        check_part("version", version)
        return version

    def create_calibrated(self, parent_ref: str, op_thresholds: list[float], calibration: dict) -> ModelEntry:
        """A new version `PARENT+calN` with these operating points; the parent is untouched.

        A single model's weights are hard-linked (copied across filesystems):
        identical bytes, so the recorded SHA-256 still verifies them."""
        parent = self.get(parent_ref)
        self.verify(parent)
        version = self.next_version(parent.name, parent.version, "cal")
        meta = {k: v for k, v in parent.meta.items() if k not in ("calibration", "imported_at", "created_at")}
        meta.update(version=version, op_threshs=[float(t) for t in op_thresholds], parent=parent.ref,
                    calibration=calibration, created_at=utc_now_iso(), created_by=current_user())
        staging = self._staging_dir()
        try:
            if not parent.is_ensemble:
                try:
                    os.link(parent.weights, staging / WEIGHTS_FILE)
                except OSError:
                    shutil.copyfile(parent.weights, staging / WEIGHTS_FILE)
                if file_sha256(staging / WEIGHTS_FILE) != parent.meta["sha256"]:
                    raise RegistryError(f"the copy of {parent.weights} does not verify")
            _write_json_durably(staging / META_FILE, meta)
            self._publish(staging, self.root / parent.name / version)
        except FileExistsError as exc:
            raise RegistryError(f"{parent.name}@{version} appeared meanwhile; run the calibration again") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(f"{parent.name}@{version}")

    def create_ensemble(self, name: str, version: str, members: list[str], op_thresholds: list[float] | None = None,
                        note: str = "") -> ModelEntry:
        """A `kind: ensemble` entry naming single-model members (never other ensembles).

        Without `op_thresholds` each label starts at the mean of the members'
        operating points; `carina model calibrate` sets proper ones."""
        check_part("name", name)
        check_part("version", version)
        if (self.root / name / version).exists():
            raise RegistryError(f"{name}@{version} already exists; versions are immutable, choose a new --version")
        if len(members) < 2 or len(set(members)) != len(members):
            raise RegistryError("an ensemble needs at least two distinct members")
        entries = [self.get(m) for m in members]
        for e in entries:
            if e.is_ensemble:
                raise RegistryError(f"{e.ref} is itself an ensemble; members must be single models")
            self.verify(e)
        if op_thresholds is None:
            op_thresholds = [sum(e.op_thresholds[i] for e in entries) / len(entries) for i in range(18)]
        meta = {
            "kind": ENSEMBLE, "name": name, "version": version, "members": [e.ref for e in entries],
            "demo": any(e.demo for e in entries), "op_threshs": [float(t) for t in op_thresholds],
            "op_threshs_source": "mean of the members' operating points" if note == "" else note,
            "created_at": utc_now_iso(), "created_by": current_user(),
        }
        staging = self._staging_dir()
        try:
            _write_json_durably(staging / META_FILE, meta)
            self._publish(staging, self.root / name / version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(f"{name}@{version}")

    def register_weights(self, name: str, version: str, state: dict, meta: dict) -> ModelEntry:
        """A new single-model entry from a state_dict (a fine-tuned candidate)."""
        from inference.model import write_weights

        check_part("name", name)
        check_part("version", version)
        if (self.root / name / version).exists():
            raise RegistryError(f"{name}@{version} already exists; versions are immutable")
        staging = self._staging_dir()
        try:
            write_weights(state, {**meta, "name": name, "version": version}, staging / WEIGHTS_FILE)
            self._publish(staging, self.root / name / version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(f"{name}@{version}")

    def export_onnx(self, ref: str) -> list[Path]:
        """Write model.onnx beside the weights of `ref` (each member's, for an ensemble)."""
        from inference.model import load_model
        from inference.onnx_backend import export_onnx

        entry = self.get(ref)
        if entry.is_ensemble:
            return [p for member in entry.members for p in self.export_onnx(member)]
        self.verify(entry)
        loaded = load_model(entry.weights, device="cpu")
        tmp = entry.directory / f".{ONNX_FILE}.tmp"
        export_onnx(loaded, tmp, weights_sha256=entry.meta["sha256"])
        # The sidecar names the file it describes only by hash, so both move as they are.
        os.replace(Path(str(tmp) + ".json"), Path(str(entry.onnx) + ".json"))
        os.replace(tmp, entry.onnx)
        fsync_dir(entry.directory)
        return [entry.onnx]

    # --- the backend pointer -------------------------------------------------------------

    def backend_override(self) -> str | None:
        try:
            text = (self.root / BACKEND_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        return text if text in BACKENDS else None

    def backend_pointer(self) -> tuple[str, int, int] | None:
        """(backend, mtime_ns, inode) of BACKEND: setting it again (even to the same value) changes it,
        so a node whose switch failed (no ONNX export yet) tries again."""
        path = self.root / BACKEND_FILE
        try:
            st = path.stat()
            value = path.read_text().strip()
        except FileNotFoundError:
            return None
        return (value, st.st_mtime_ns, st.st_ino) if value in BACKENDS else None

    def set_backend(self, backend: str | None) -> None:
        """Make a running node switch runtime (None: back to inference.backend)."""
        if backend is None:
            (self.root / BACKEND_FILE).unlink(missing_ok=True)
            fsync_dir(self.root)
            return
        if backend not in BACKENDS:
            raise RegistryError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self._write_pointer(BACKEND_FILE, backend)

    def _append_line(self, path: Path, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

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
        self._write_pointer(ACTIVE_FILE, ref)

    def _write_pointer(self, filename: str, value: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{filename}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(value + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / filename)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.root)


def _write_json_durably(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# --- the running node's model -----------------------------------------------------------------


class ModelManager:
    """Loads the configured model into a `BatchingEngine` and keeps it current.

    With `inference.weights` set the node is pinned to that file. Otherwise it
    runs the registry's ACTIVE model and polls the pointer every
    `inference.model_poll_seconds`; on a change it loads and warms the new
    model beside the old one (which keeps serving), then swaps it in between
    two batches. A model that fails to load is logged and the old one stays.
    The runtime (`inference.backend`, overridden by the registry's BACKEND
    file) is polled the same way, so switching torch <-> onnxruntime needs no
    restart either. `inference.shadow` names a candidate scored beside the
    active model (node/shadow.py); it follows the runtime, and a shadow that
    cannot be loaded only turns shadow mode off.
    """

    def __init__(self, settings, registry: ModelRegistry | None = None):
        self.settings = settings
        self.inference = settings.inference
        self.registry = registry or ModelRegistry.for_settings(settings)
        self.pinned = self.inference.weights is not None
        self.batcher = None  # inference.batcher.BatchingEngine once a model is loaded
        self.on_ready = None  # called once, with the batcher, when the first model is loaded
        self.backend: str | None = None  # the runtime of the engine being served
        self._seen_pointer: tuple | None = None  # (ACTIVE, BACKEND pointers, backend) last acted on (loaded or failed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def wanted_backend(self) -> str:
        if self.pinned:
            return self.inference.backend
        return self.registry.backend_override() or self.inference.backend

    # --- start / stop -----------------------------------------------------------------

    def start(self):
        """Load the initial model (raises if it cannot) and start watching the registry."""
        backend = self.wanted_backend()
        if self.pinned:
            log.info("inference.weights pins the model to %s; registry activation is ignored", self.inference.weights)
            engine = self._single_engine(Path(self.inference.weights), backend)
        else:
            self.registry.ensure_demo()
            self._hint_unimported_xrv_cache()
            pointer = self.registry.active_pointer()
            self._seen_pointer = (pointer, self.registry.backend_pointer(), backend)
            engine = self._engine_for(pointer[0], backend)
        self._install(engine, backend)
        self._load_shadow(backend)
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
        """One poll: if ACTIVE names another model (or another runtime is wanted), load it
        and swap it in. True if swapped."""
        if self.pinned:
            return False
        with self._lock:
            pointer = self.registry.active_pointer()
            backend = self.wanted_backend()
            seen = (pointer, self.registry.backend_pointer(), backend)
            if pointer is None or seen == self._seen_pointer:
                return False
            self._seen_pointer = seen
            ref = pointer[0]
            running = self.batcher.model_info.ref if self.batcher is not None else None
            if ref == running and backend == self.backend:
                return False
            try:
                engine = self._engine_for(ref, backend)
            except Exception as exc:
                log.error("model %s was activated but cannot be loaded (%s runtime); still running %s: %s",
                          ref, backend, running, exc)
                return False
            previous_backend = self.backend
            self._install(engine, backend)
            if backend != previous_backend:
                self._load_shadow(backend)
            log.info("model switched: %s -> %s (runtime %s)%s", running, ref,
                     backend if backend == previous_backend else f"{previous_backend} -> {backend}",
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

    def engine_for(self, ref: str, backend: str | None = None):
        """A stand-alone engine for a registry entry, configured like the node's
        (device, runtime, severity bands): what `carina eval` and friends score with."""
        return self._engine_for(ref, backend or self.wanted_backend())

    def _engine_for(self, ref: str, backend: str):
        """The engine for a registry entry: a single model, or an ensemble of its members."""
        entry = self.registry.get(ref)
        if not entry.is_ensemble:
            return self._single_engine(entry.weights, backend)
        from inference import SeverityBands
        from inference.ensemble import EnsembleEngine, ensemble_info

        members = [self._single_engine(self.registry.get(m).weights, backend) for m in entry.members]
        info = ensemble_info(entry.name, entry.version, [m.model_info for m in members])
        return EnsembleEngine(members, info, entry.op_thresholds, region_threshold=self.inference.region_threshold,
                              max_batch=members[0].max_batch,
                              severity_bands=SeverityBands.from_pairs(self.inference.severity_bands))

    def _single_engine(self, weights: Path, backend: str):
        from inference import InferenceEngine, SeverityBands, load_model, warm_up
        from inference.batcher import default_max_batch

        inf = self.inference
        if backend == "onnxruntime":
            from inference.onnx_backend import load_onnx_model, warm_up_onnx

            # The export sits beside its weights: models/NAME/VERSION/model.onnx (or FILE.onnx when pinned).
            loaded = load_onnx_model(Path(weights).with_suffix(".onnx"), weights,
                                     providers=inf.onnx_providers or None, cpu_threads=inf.cpu_threads)
            max_batch = inf.max_batch or default_max_batch("cuda" if "CUDAExecutionProvider" in loaded.providers
                                                           or "TensorrtExecutionProvider" in loaded.providers else "cpu")
            warm_up_onnx(loaded, (1, max_batch))
        else:
            loaded = load_model(weights, device=inf.device, cpu_threads=inf.cpu_threads)
            max_batch = inf.max_batch or default_max_batch(loaded.device.type)
            warm_up(loaded, (1, max_batch))
        return InferenceEngine(
            loaded,
            region_threshold=inf.region_threshold,
            max_batch=max_batch,
            severity_bands=SeverityBands.from_pairs(inf.severity_bands),
        )

    def _install(self, engine, backend: str) -> None:
        from inference import BatchingEngine

        self.backend = backend
        if self.batcher is None:
            # max_batch from the engine: the configured value, or the device's auto value.
            self.batcher = BatchingEngine(engine, max_batch=engine.max_batch, max_wait_ms=self.inference.max_wait_ms)
            if self.on_ready is not None:
                self.on_ready(self.batcher)
        else:
            self.batcher.swap(engine)

    def _load_shadow(self, backend: str) -> None:
        """Put `inference.shadow` behind the batcher; on failure shadow mode is off, the node runs on."""
        ref = self.inference.shadow
        if not ref or self.batcher is None:
            return
        try:
            engine = self._engine_for(ref, backend)
        except Exception as exc:
            log.error("shadow model %s cannot be loaded (%s runtime); shadow mode is off: %s", ref, backend, exc)
            self.batcher.set_shadow(None)
            return
        if engine.model_info.ref == self.batcher.model_info.ref:
            log.warning("shadow model %s is the active model: its agreement will be perfect", ref)
        self.batcher.set_shadow(engine)

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


