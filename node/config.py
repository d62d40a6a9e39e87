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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from node.states import OutputKind

DEFAULT_CONFIG_PATH = Path("config/carina.yaml")


class _Strict(BaseModel):
    # A typo in a hospital's config must stop start-up, not be ignored.
    model_config = ConfigDict(extra="forbid")


def _ae_title(value: str) -> str:
    if not value or len(value) > 16 or "\\" in value or not value.isprintable():
        raise ValueError("an AE title is 1-16 printable characters without backslash")
    return value


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_name(value: str) -> str:
    if not _ENV_NAME.match(value):
        raise ValueError("must be the NAME of an environment variable (letters, digits, underscore), not a secret")
    return value


class StorageSettings(_Strict):
    data_dir: Path = Path("var")
    # Below this many free MiB the SCP answers 0xA700 instead of accepting.
    min_free_mb: int = Field(default=512, ge=0)
    # The start-up sweep (node/sweep.py) only touches files at least this old.
    # 0 is right for one node; raise it when several nodes share data_dir, so
    # one node's sweep never takes a file another is just committing.
    sweep_min_age_seconds: float = Field(default=0.0, ge=0)


class DatabaseSettings(_Strict):
    # Empty means SQLite inside storage.data_dir.
    url: str = ""


class DicomPeer(_Strict):
    """A sender allowed to associate: its calling AE title and where it connects from."""

    ae_title: str
    # An address (10.1.2.3), a network in CIDR form (10.1.2.0/24) or a hostname
    # (resolved when the peer connects).
    host: str

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        value = value.strip()
        if not value or any(c.isspace() for c in value):
            raise ValueError("an address, a CIDR network or a hostname")
        if "/" in value:
            import ipaddress

            try:
                ipaddress.ip_network(value, strict=False)
            except ValueError as exc:
                raise ValueError(f"not a CIDR network: {exc}") from None
        return value


class DicomTlsSettings(_Strict):
    """A second, TLS-only listener for the SCP (same AE title, peers and limits)."""

    port: int = Field(ge=1, le=65535)
    certificate: Path  # PEM, the node's certificate (chain)
    private_key: Path  # PEM, unencrypted; readable by the node's user only
    # PEM bundle of the CA(s) that sign the senders' certificates.
    ca_certificates: Path | None = None
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _ca_for_clients(self) -> "DicomTlsSettings":
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates to verify the senders against")
        return self


class DicomSettings(_Strict):
    ae_title: str = "CARINA"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    stable_seconds: float = Field(default=5.0, gt=0)
    # Also complete a study when the association that brought its last
    # instance is released, without waiting stable_seconds (node/completion.py).
    # For senders that push a whole study per association; off by default,
    # because a modality may send one study over several associations.
    complete_on_release: bool = False
    max_associations: int = Field(default=10, ge=1)
    # Processes receiving on the DICOM ports (node/intake_processes.py): one
    # process receives at most what one core does; N - 1 more share its
    # listening sockets. max_associations applies to each process.
    receiver_processes: int = Field(default=1, ge=1, le=32)
    # Who may send: an association from any other calling AE title, or from a
    # known one at another address, is rejected at negotiation. An empty list
    # stops start-up unless accept_any_peer is set explicitly.
    peers: list[DicomPeer] = Field(default_factory=list)
    accept_any_peer: bool = False
    tls: DicomTlsSettings | None = None
    # Largest P-DATA-TF PDU accepted (and advertised); a longer one is aborted.
    max_pdu_bytes: int = Field(default=256 * 1024, ge=4096, le=16 * 2**20)
    # A Deflated dataset that inflates beyond this is refused (0xC000).
    max_inflated_mb: int = Field(default=128, ge=1, le=4096)

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))

    @model_validator(mode="before")
    @classmethod
    def _replaced_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "allowed_calling_aets" in data:
            raise ValueError(
                "allowed_calling_aets was replaced by dicom.peers: list each sender as "
                "{ae_title: MODALITY, host: 10.1.2.3} (host: an address, a CIDR network or a hostname)"
            )
        return data

    @model_validator(mode="after")
    def _peers_or_any(self) -> "DicomSettings":
        if self.peers and self.accept_any_peer:
            raise ValueError("set dicom.peers or dicom.accept_any_peer: true, not both")
        return self

    @property
    def max_inflated_bytes(self) -> int:
        return self.max_inflated_mb * 2**20


class ApiTlsSettings(_Strict):
    """HTTPS served by uvicorn itself. Without it, run Carina behind a TLS reverse
    proxy (docs/security.md) and set `security.assume_https`."""

    certfile: Path | None = None  # PEM certificate (chain); setting it turns TLS on
    keyfile: Path | None = None  # PEM private key
    # Name of the environment variable holding the key's passphrase, if it has one.
    keyfile_password_env: str | None = None

    @property
    def enabled(self) -> bool:
        return self.certfile is not None

    @field_validator("keyfile_password_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        return None if v is None else _env_name(v)


class ApiSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    tls: ApiTlsSettings = Field(default_factory=ApiTlsSettings)
    # Reverse proxies whose X-Forwarded-For/-Proto are believed (uvicorn's
    # forwarded_allow_ips); empty believes none, so the client address in the
    # audit trail and the rate limits is the TCP peer.
    trusted_proxies: list[str] = Field(default_factory=list)
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


class DestinationTls(_Strict):
    """DICOM TLS to a destination: its certificate must chain to `ca_certificates`
    and name `server_name` (default: the destination's host)."""

    ca_certificates: Path
    certificate: Path | None = None  # ours, for a PACS that requires client certificates
    private_key: Path | None = None
    server_name: str | None = None

    @model_validator(mode="after")
    def _key_with_certificate(self) -> "DestinationTls":
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


class RetryPolicy(_Strict):
    """When a failed delivery is tried again, and when it gives up.

    Exponential from `base_seconds`, doubling up to `max_seconds` (with
    jitter), for `give_up_after_seconds` since its first failure (72 h by
    default), whatever the number of attempts: a PACS or EHR maintenance
    window of a weekend loses nothing. After that the job is dead-lettered
    (`/readyz` degraded, `carina_dead_letter_jobs`, `carina jobs retry`)."""

    base_seconds: float = Field(default=30.0, gt=0)
    max_seconds: float = Field(default=900.0, gt=0)
    give_up_after_seconds: float = Field(default=72 * 3600.0, gt=0)


class _Destination(_Strict):
    """What every destination has: a name (the jobs' `destination`) and,
    optionally, its own retry policy instead of the top-level `delivery`."""

    name: str
    retry: RetryPolicy | None = None


class DicomDestination(_Destination):
    type: Literal["dicom"]
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = None
    tls: DestinationTls | None = None

    _check_ae = field_validator("ae_title")(classmethod(lambda cls, v: _ae_title(v)))


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


class FhirDestination(_Destination):
    """A FHIR R4 server that receives each report as a transaction Bundle."""

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


class Hl7Destination(_Destination):
    """An HL7 v2.5.1 receiver (RIS/EHR interface engine) reached over MLLP."""

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


class DicomWebDestination(_Destination):
    """A PACS or archive that takes STOW-RS: every DICOM output of each version,
    POSTed to `<base_url>/studies/<StudyInstanceUID>` (node/destinations/dicomweb.py)."""

    type: Literal["dicomweb"]
    base_url: str  # the DICOMweb root, e.g. https://pacs.example.org/dicom-web
    auth: Annotated[Union[BearerAuth, BasicAuth], Field(discriminator="type")] | None = None
    timeout_seconds: float = Field(default=120.0, gt=0)
    # TLS: true (system CAs), false (no verification; test rigs only) or a CA bundle path.
    verify_tls: bool | str = True

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("base_url must be an http(s) URL, e.g. https://pacs.example.org/dicom-web")
        return value.rstrip("/")


Destination = Annotated[Union[DicomDestination, FhirDestination, Hl7Destination, DicomWebDestination],
                        Field(discriminator="type")]


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


class ShutdownSettings(_Strict):
    # On SIGTERM/SIGINT: how long open associations and running stages may
    # take to finish before they are aborted (stages: released at once).
    grace_seconds: float = Field(default=30.0, ge=0)


class HealthSettings(_Strict):
    # /readyz reports "degraded" (503) while a dead-letter job is older than this.
    dead_letter_max_age_seconds: float = Field(default=0.0, ge=0)


class RetentionSettings(_Strict):
    """What the scheduled purge (node/retention.py) removes; null keeps forever.

    Never: audit records, node events, results and FHIR resources, or any
    study whose results are not delivered everywhere."""

    instances_days: float | None = Field(default=None, ge=0)  # received files, their rows and renditions
    outputs_days: float | None = Field(default=None, ge=0)  # encoded SR/SC files and their rows
    jobs_days: float | None = Field(default=None, ge=0)  # finished (done) job rows
    interval_seconds: float = Field(default=3600.0, gt=0)


class LoggingSettings(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"  # json: one JSON object per line, with study UID and job id
    # Empty: stderr (journald/Docker rotate it). A path: a file rotated at max_bytes.
    file: Path | None = None
    max_bytes: int = Field(default=50 * 1024 * 1024, ge=1024)
    backup_count: int = Field(default=5, ge=1)


class PipelineSettings(_Strict):
    # >= 2 lets the inference batcher merge images from different studies.
    # Most of a worker's time in a burst is spent waiting: for the PACS to
    # store what it sends, for the stage process, for a batch. With three, a
    # 2-core node's cores were not busy (bench/e2e.py, quiet hour: 3.4 studies/s
    # with three, 3.8-4.2 with six). An idle worker costs only a thread; busy
    # ones hold more studies at once (~120 MiB more peak RSS with six).
    workers: int = Field(default=6, ge=1)
    # Processes that run encode and capture apart from the workers' GIL
    # (node/pipeline/processes.py); 0 runs them in the workers' own process.
    stage_processes: int = Field(default=1, ge=0)
    lease_seconds: float = Field(default=120.0, gt=0)
    poll_seconds: float = Field(default=0.5, gt=0)
    max_attempts: int = Field(default=8, ge=1)
    backoff_base_seconds: float = Field(default=2.0, gt=0)
    backoff_max_seconds: float = Field(default=300.0, gt=0)


# Debian's fonts-dejavu-core (scripts/ensure-peers.sh installs it): DejaVu Sans
# has every glyph the report prints (the em dash of the demo caveat included)
# and the Latin, Greek and Cyrillic of patient names.
DEJAVU_DIR = Path("/usr/share/fonts/truetype/dejavu")


class ReportPdfSettings(_Strict):
    """The printable PDF report (node/outputs/pdf_report.py), one per study version.

    It is rendered when any of its three uses is on: the DICOM Encapsulated PDF
    (`pdf` in `outputs.kinds`), `fhir` or `download`."""

    # DiagnosticReport.presentedForm: the PDF inline (application/pdf, base64),
    # in the FHIR API and in every FHIR push.
    fhir: bool = True
    # GET /api/v1/studies/{uid}/report.pdf (viewer and up).
    download: bool = True
    # A directory holding DejaVuSans.ttf and DejaVuSans-Bold.ttf.
    font_dir: Path = DEJAVU_DIR


class ScSettings(_Strict):
    """The heatmap Secondary Captures (node/outputs/sc.py)."""

    # Longest side of each SC's picture (the caption band is added above it).
    # An SC is uncompressed RGB: a 2048^2 source drawn at full size is ~12 MB per
    # SC (one per positive finding plus a summary), which the encode stage writes
    # and the PACS stores; 1024 is what a viewer's thumbnail or side-by-side
    # panel shows, at a quarter of the bytes. Smaller sources are never upscaled.
    # At most 2048: the rendition infer keeps (node/outputs/sc.py MAX_SIDE).
    max_side: int = Field(default=1024, ge=256, le=2048)


class OutputSettings(_Strict):
    """Which DICOM objects the encode stage writes and DICOM destinations receive."""

    # sr: TID 1500 SR (every finding); sc: burned-in heatmap Secondary Captures;
    # seg: a DICOM Segmentation per image (overlays OHIF toggles); gsps: a
    # presentation state per image (graphic layers a classic PACS toggles);
    # pdf: the printable report as a DICOM Encapsulated PDF.
    kinds: list[OutputKind] = Field(default_factory=lambda: list(OutputKind))
    sc: ScSettings = Field(default_factory=ScSettings)
    report_pdf: ReportPdfSettings = Field(default_factory=ReportPdfSettings)

    @property
    def renders_pdf(self) -> bool:
        return OutputKind.PDF in self.kinds or self.report_pdf.fhir or self.report_pdf.download

    @field_validator("kinds")
    @classmethod
    def _sr_and_unique(cls, value: list[OutputKind]) -> list[OutputKind]:
        twice = sorted({k for k in value if value.count(k) > 1})
        if twice:
            raise ValueError(f"each output kind once; repeated: {', '.join(twice)}")
        if OutputKind.SR not in value:
            # The SR is the PACS's record of the run: all 14 findings (the
            # negatives too, which no overlay shows), the demo caveat, the
            # model, and the chain of amended versions (Predecessor Documents).
            raise ValueError("sr cannot be turned off: it is the only DICOM output that records every finding")
        return value


class StowSender(_Strict):
    """A client allowed to STOW-RS studies in: its API token and the source name
    its studies are keyed by, in place of a DICOM calling AE title."""

    token: str  # the token's name (`carina token create --name NAME --role integration`)
    source: str  # 1-16 characters, like an AE title; several tokens may share one

    _check_source = field_validator("source")(classmethod(lambda cls, v: _ae_title(v)))


class DicomWebSettings(_Strict):
    """DICOMweb at /dicomweb: STOW-RS in, QIDO-RS and WADO-RS over Carina's outputs."""

    enabled: bool = True
    # Who may STOW-RS studies in; any other token gets 403. Empty: nobody.
    stow_senders: list[StowSender] = Field(default_factory=list)
    # One part (instance) larger than this fails with 0xA700; a request larger
    # than max_request_mb is refused with 413 (at once when it says its length).
    max_part_mb: float = Field(default=2048, gt=0)
    max_request_mb: float = Field(default=8192, gt=0)

    @field_validator("stow_senders")
    @classmethod
    def _one_source_per_token(cls, value: list[StowSender]) -> list[StowSender]:
        tokens = [s.token for s in value]
        twice = sorted({t for t in tokens if tokens.count(t) > 1})
        if twice:
            raise ValueError(f"each token once; repeated: {', '.join(twice)}")
        return value

    def source_of(self, token_name: str) -> str | None:
        return next((s.source for s in self.stow_senders if s.token == token_name), None)


class RateLimit(_Strict):
    """At most `requests` in any `per_seconds` window; beyond that 429 with Retry-After."""

    requests: int = Field(ge=1)
    per_seconds: float = Field(gt=0)


class SecuritySettings(_Strict):
    """Web sessions, tokens, passwords and rate limits (node/api/)."""

    session_idle_minutes: float = Field(default=30, gt=0)
    session_max_hours: float = Field(default=12, gt=0)
    token_default_days: int = Field(default=90, ge=1)
    token_max_days: int = Field(default=365, ge=1)
    password_min_length: int = Field(default=12, ge=8)
    # True when a TLS-terminating reverse proxy serves Carina: cookies get
    # Secure and responses HSTS, as with api.tls.
    assume_https: bool = False
    hsts_max_age_seconds: int = Field(default=31536000, ge=0)
    # Per client address and, separately, per user name.
    login_rate: RateLimit = Field(default_factory=lambda: RateLimit(requests=10, per_seconds=300))
    # Per token or user.
    predict_rate: RateLimit = Field(default_factory=lambda: RateLimit(requests=120, per_seconds=60))


class UploadSettings(_Strict):
    """The reading app's upload (POST /api/v1/upload): one DICOM, PNG or JPEG
    (at most inference.predict_max_upload_mb), or a zip of them, bounded so
    that a hostile archive costs little (node/uploads.py)."""

    max_zip_mb: float = Field(default=512.0, gt=0)  # the archive itself
    max_members: int = Field(default=200, ge=1)  # images in one archive
    max_total_mb: float = Field(default=2048.0, gt=0)  # all members, uncompressed
    # Uncompressed/compressed size of a member over 1 MB beyond which it is a zip bomb.
    max_ratio: float = Field(default=100.0, gt=1)


class UiSettings(_Strict):
    """The reading web app (node/api/pages.py)."""

    refresh_seconds: float = Field(default=5.0, gt=0)  # worklist polling (answered 304 while unchanged)
    upload: UploadSettings = Field(default_factory=UploadSettings)


class SyslogSettings(_Strict):
    """Forward every audit record to a syslog collector (RFC 5424 over TCP,
    octet-counting framing of RFC 5425/6587; TLS optional)."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=6514, ge=1, le=65535)
    tls: bool = False
    ca_file: Path | None = None  # verify the collector against this CA (else the system store)
    certfile: Path | None = None  # client certificate, if the collector asks for one
    keyfile: Path | None = None
    app_name: str = "carina"
    reconnect_seconds: float = Field(default=5.0, gt=0)


class AuditSettings(_Strict):
    """The audit trail (node/audit/): DICOM audit messages in the database, hash-chained."""

    # AuditSourceID of every message; empty: carina@<hostname>.
    source_id: str = ""
    enterprise_site_id: str = ""
    syslog: SyslogSettings = Field(default_factory=SyslogSettings)


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
    ui: UiSettings = Field(default_factory=UiSettings)
    hl7_listener: Hl7ListenerSettings = Field(default_factory=Hl7ListenerSettings)
    outputs: OutputSettings = Field(default_factory=OutputSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    delivery: RetryPolicy = Field(default_factory=RetryPolicy)  # every destination, unless it sets `retry`
    shutdown: ShutdownSettings = Field(default_factory=ShutdownSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    dicomweb: DicomWebSettings = Field(default_factory=DicomWebSettings)

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

    def retry_policy(self, destination_name: str) -> RetryPolicy:
        """The delivery retry policy of one destination (its own, else `delivery`)."""
        found = next((d for d in self.destinations if d.name == destination_name), None)
        return found.retry if found is not None and found.retry is not None else self.delivery

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.storage.data_dir / 'carina.db'}"


class ConfigError(Exception):
    """Start-up must stop; the message names the bad key."""


def check_serve(settings: Settings, role: str = "all") -> None:
    """What `carina serve --role ROLE` needs beyond a valid file (other subcommands do not)."""
    if settings.outputs.renders_pdf:
        fonts = settings.outputs.report_pdf.font_dir
        missing = [name for name in ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf") if not (fonts / name).is_file()]
        if missing:
            raise ConfigError(
                f"outputs.report_pdf.font_dir: {', '.join(missing)} not found in {fonts}; install Debian's "
                "fonts-dejavu-core, point font_dir at DejaVu Sans, or turn the PDF report off "
                "(drop pdf from outputs.kinds and set outputs.report_pdf.fhir and .download to false)"
            )
    dicom = settings.dicom
    if role in ("all", "receiver") and not dicom.peers and not dicom.accept_any_peer:
        raise ConfigError(
            "dicom.peers is empty: list the senders allowed to push, e.g.\n"
            "  dicom:\n    peers:\n      - {ae_title: MODALITY, host: 10.1.2.3}\n"
            "or set dicom.accept_any_peer: true to accept any calling AE from any address (not for production)"
        )


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
