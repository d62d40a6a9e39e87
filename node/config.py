"""The one validated configuration model.

Precedence, highest first: environment (`CARINA_` prefix, `__` for nesting),
then the YAML file, then the defaults below. Every `carina` subcommand loads it
through `load_settings`, so they all see the same node.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CONFIG_PATH = Path("config/carina.yaml")


class _Strict(BaseModel):
    # A typo in a hospital's config must stop start-up, not be ignored.
    model_config = ConfigDict(extra="forbid")


def _ae_title(value: str) -> str:
    if not value or len(value) > 16 or "\\" in value or not value.isprintable():
        raise ValueError("an AE title is 1-16 printable characters without backslash")
    return value


class StorageSettings(_Strict):
    data_dir: Path = Path("var")
    # Below this many free MiB the SCP answers 0xA700 instead of accepting.
    min_free_mb: int = Field(default=512, ge=0)


class DatabaseSettings(_Strict):
    # Empty means SQLite inside storage.data_dir.
    url: str = ""


class DicomSettings(_Strict):
    ae_title: str = "CARINA"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    stable_seconds: float = Field(default=5.0, gt=0)
    max_associations: int = Field(default=10, ge=1)
    # Calling AE titles allowed to send; empty accepts any.
    allowed_calling_aets: list[str] = Field(default_factory=list)

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))


class ApiSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    # Patient identifiers in FHIR use this system; the value is the DICOM PatientID.
    patient_identifier_system: str = "urn:oid:1.2.826.0.1.3680043.10.1249.1"
    # Absolute base URL for links in FHIR bundles; empty derives it from the request.
    public_base_url: str = ""


class InferenceSettings(_Strict):
    # Pin the node to one safetensors file (with its .json sidecar), bypassing the
    # model registry and hot-swap. Empty: run the registry's active model
    # (<data_dir>/models, managed with `carina model import|list|activate`).
    weights: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int = Field(default=0, ge=0)
    # Relative CAM level that outlines a positive finding's region.
    region_threshold: float = Field(default=0.5, gt=0, lt=1)
    # Dynamic batching across studies and API calls. max_batch 0 = auto: 4 on CPU
    # (fastest per image there), 32 on CUDA.
    max_batch: int = Field(default=0, ge=0, le=256)
    max_wait_ms: float = Field(default=10.0, ge=0, le=1000)
    # How often the node re-reads the registry's active pointer; 0 disables hot-swap.
    model_poll_seconds: float = Field(default=2.0, ge=0)
    # [lower bound, grade] on the probability normalised at each label's
    # operating point (0.5 = the operating point), ascending from 0.
    severity_bands: list[tuple[float, str]] = Field(
        default_factory=lambda: [[0.0, "none"], [0.5, "low"], [0.7, "moderate"], [0.85, "high"]]
    )
    # POST /api/v1/predict refuses larger uploads with 413.
    predict_max_upload_mb: float = Field(default=64.0, gt=0)
    # Runtime: torch, or ONNX Runtime on the graph `carina model export-onnx` wrote
    # beside the weights. `carina model backend` switches a running node.
    backend: Literal["torch", "onnxruntime"] = "torch"
    # onnxruntime execution providers in order; empty picks TensorRT > CUDA > CPU
    # among those installed (TensorRT needs the onnxruntime-gpu build).
    onnx_providers: list[str] = Field(default_factory=list)
    # Shadow mode: NAME@VERSION of a candidate scored beside the active model on
    # every routed study; its results are stored (shadow_results), never delivered.
    shadow: str | None = None

    @field_validator("shadow")
    @classmethod
    def _model_ref(cls, v: str | None) -> str | None:
        if v:
            from node.models import RegistryError, parse_ref

            try:
                parse_ref(v)
            except RegistryError as exc:
                raise ValueError(str(exc)) from None
        return v or None

    @field_validator("weights")
    @classmethod
    def _safetensors_only(cls, v: Path | None) -> Path | None:
        if v is not None and v.suffix != ".safetensors":
            raise ValueError(
                "must be a .safetensors file with its .json sidecar; a torchxrayvision .pt is never "
                "unpickled at run time: import it with `carina model import FILE --name --version --sha256`"
            )
        return v

    @field_validator("severity_bands")
    @classmethod
    def _bands(cls, v: list[tuple[float, str]]) -> list[tuple[float, str]]:
        from inference.severity import check_bands

        check_bands([(float(lo), str(g)) for lo, g in v])
        return v


class RoutingSettings(_Strict):
    """What goes to the model. Everything else is stored and marked ignored
    with the rule that excluded it."""

    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    # Secondary Capture is only scored when its BodyPartExamined says chest.
    sc_body_parts: list[str] = Field(default_factory=lambda: ["CHEST"])
    body_parts: list[str] = Field(default_factory=lambda: ["CHEST"])
    view_positions: list[str] = Field(default_factory=lambda: ["PA", "AP"])
    score_laterals: bool = False  # LL/RL views; the model was trained on frontal views
    min_age_years: int | None = Field(default=18, ge=0)
    missing_age_eligible: bool = True
    missing_body_part_eligible: bool = False
    missing_view_position_eligible: bool = False


class DicomDestination(_Strict):
    name: str
    type: Literal["dicom"]
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = None

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_name(value: str) -> str:
    if not _ENV_NAME.match(value):
        raise ValueError("must be the NAME of an environment variable (letters, digits, underscore), not a secret")
    return value


class BearerAuth(_Strict):
    """`Authorization: Bearer <token>`; the token is read from `token_env` at send time."""

    type: Literal["bearer"]
    token_env: str

    _check_env = field_validator("token_env")(classmethod(lambda cls, v: _env_name(v)))


class BasicAuth(_Strict):
    """HTTP Basic; the password is read from `password_env` at send time."""

    type: Literal["basic"]
    username: str
    password_env: str

    _check_env = field_validator("password_env")(classmethod(lambda cls, v: _env_name(v)))


class FhirDestination(_Strict):
    """A FHIR R4 server that receives each report as a transaction Bundle."""

    name: str
    type: Literal["fhir"]
    base_url: str
    auth: Annotated[Union[BearerAuth, BasicAuth], Field(discriminator="type")] | None = None
    timeout_seconds: float = Field(default=30.0, gt=0)
    # TLS: true (system CAs), false (no verification; test rigs only) or a CA bundle path.
    verify_tls: bool | str = True
    # Also conditionally create the Patient (from the DICOM header) keyed on its
    # identifier. Off by default: most EHRs own their patients and only need
    # the logical reference (subject.identifier) Carina always sends.
    send_patient: bool = False

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("base_url must be an http(s) URL, e.g. https://ehr.example.org/fhir")
        return value.rstrip("/")


class Hl7Destination(_Strict):
    """An HL7 v2.5.1 receiver (RIS/EHR interface engine) reached over MLLP."""

    name: str
    type: Literal["hl7"]
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = "CARINA"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: Literal["P", "T", "D"] = "P"  # MSH-11: production, training, debugging
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    ack_timeout_seconds: float = Field(default=30.0, gt=0)
    # CX-4 assigning authority of PID-3 as an HD ("NS&UID&ISO"); empty derives
    # it from api.patient_identifier_system when that is urn:oid:...
    patient_id_authority: str = ""


Destination = Annotated[Union[DicomDestination, FhirDestination, Hl7Destination], Field(discriminator="type")]


class TriageSettings(_Strict):
    """Findings that make a study STAT (see node/triage.py)."""

    enabled: bool = True
    critical_findings: list[str] = Field(default_factory=lambda: ["Pneumothorax"])
    # Probability at or above which a critical finding raises priority;
    # null uses the model's own operating point for that label.
    threshold: float | None = Field(default=None, ge=0, le=1)

    @field_validator("critical_findings")
    @classmethod
    def _known_labels(cls, value: list[str]) -> list[str]:
        from inference.types import CHESTXRAY14

        unknown = [v for v in value if v not in CHESTXRAY14]
        if unknown:
            raise ValueError(f"unknown finding(s) {unknown}; use ChestX-ray14 labels: {', '.join(CHESTXRAY14)}")
        return value


class Hl7ListenerSettings(_Strict):
    """Optional inbound MLLP listener for ORM^O01 orders and ADT demographics."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=2575, ge=1, le=65535)
    application: str = "CARINA"  # MSH-3 of the ACKs Carina sends
    facility: str = ""
    idle_timeout_seconds: float = Field(default=300.0, gt=0)


class PipelineSettings(_Strict):
    # >= 2 lets the inference batcher merge images from different studies.
    workers: int = Field(default=2, ge=1)
    lease_seconds: float = Field(default=120.0, gt=0)
    poll_seconds: float = Field(default=0.5, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    backoff_base_seconds: float = Field(default=2.0, gt=0)
    backoff_max_seconds: float = Field(default=300.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CARINA_", env_nested_delimiter="__", extra="forbid")

    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    destinations: list[Destination] = Field(default_factory=list)
    triage: TriageSettings = Field(default_factory=TriageSettings)
    hl7_listener: Hl7ListenerSettings = Field(default_factory=Hl7ListenerSettings)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list) -> list:
        names = [d.name for d in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(twice)}")
        return value

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # Environment beats the YAML file (passed as init kwargs), which beats defaults.
        return (env_settings, init_settings)

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.storage.data_dir / 'carina.db'}"


class ConfigError(Exception):
    """Start-up must stop; the message names the bad key."""


def resolve_config_path(cli_path: str | os.PathLike | None) -> Path | None:
    if cli_path:
        return Path(cli_path)
    if os.environ.get("CARINA_CONFIG"):
        return Path(os.environ["CARINA_CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def load_settings(cli_path: str | os.PathLike | None = None) -> Settings:
    path = resolve_config_path(cli_path)
    raw: dict[str, Any] = {}
    if path is not None:
        if not path.exists():
            raise ConfigError(f"configuration file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        return Settings(**raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None


def _describe(exc: ValidationError, path: Path | None) -> str:
    lines = [f"invalid configuration{f' in {path}' if path else ''}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)
