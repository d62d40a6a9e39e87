"""The one validated configuration model.

Precedence, highest first: environment (`CARINA_` prefix, `__` for nesting),
then the YAML file, then the defaults below. Every `carina` subcommand loads it
through `load_settings`, so they all see the same node.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

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
    weights: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int = Field(default=0, ge=0)
    # Relative CAM level that outlines a positive finding's region.
    region_threshold: float = Field(default=0.5, gt=0, lt=1)


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


Destination = Annotated[Union[DicomDestination], Field(discriminator="type")]


class PipelineSettings(_Strict):
    workers: int = Field(default=1, ge=1)
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
