"""Service configuration: one typed settings object read from ``CAMSERVE_*`` variables.

Nothing here touches torch; the device string is validated for shape only and resolved
by the engine when it starts.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
# Images per batch by device kind when CAMSERVE_MAX_BATCH_SIZE is unset. A CPU's cores are
# busy at 8; a GPU is far from full there, and 64 is a first guess for CUDA, to be measured
# by `make gpu-check` (service.gpucheck). Kinds not listed take the CPU's.
BATCH_DEFAULTS = {"cpu": 8, "cuda": 64}


class Settings(BaseSettings):
    """Every operator-facing knob of the service. Defaults follow the HTTP contract."""

    model_config = SettingsConfigDict(env_prefix="CAMSERVE_", extra="ignore")

    device: str = Field("auto", description="cpu, cuda, cuda:1, ...; auto takes CUDA when present")
    models_file: Path | None = Field(None, description="TOML or JSON file registering models")
    default_model: str = Field("mobilenet_v2", description="model used when a request names none")
    max_batch_size: int | None = Field(
        None, ge=1, le=256, description="images per batch; unset: the device's own default "
        "(BATCH_DEFAULTS: 8 on the CPU, 64 on CUDA)",
    )
    max_batch_delay_ms: float = Field(5.0, ge=0, le=10_000)
    max_queue: int = Field(64, ge=1)
    # The heavy lane (service.engine.turns, service.cams.passes): long explanations run in
    # chunks of about pass_budget_ms, light work going first between any two of them.
    pass_budget_ms: float = Field(100.0, ge=5, le=10_000, description="target duration of one chunk")
    heavy_concurrency: int = Field(16, ge=1, le=256, description="heavy explanations in progress per device")
    max_request_passes: int = Field(
        50_000, ge=1, description="forward-pass equivalents one request may cost (else 422)"
    )
    # The one PACS the service talks to over DICOMweb (service.api.pacs); no URL: no DICOMweb.
    dicomweb_url: str | None = Field(None, description="DICOMweb root of the PACS")
    dicomweb_token: str | None = Field(None, description="bearer token for the PACS")
    dicomweb_user: str | None = Field(None, description="basic-auth user for the PACS")
    dicomweb_password: str | None = Field(None, description="basic-auth password for the PACS")
    dicomweb_timeout_s: float = Field(30.0, gt=0, le=600, description="one PACS call's time limit")
    max_series_images: int = Field(256, ge=1, description="images one DICOMweb job may explain")
    # Jobs (POST /jobs): long explanations followed by polling or server-sent events.
    job_ttl_s: float = Field(3600.0, gt=0, description="how long a finished job is kept")
    max_jobs: int = Field(100, ge=1, description="jobs held at once, queued, running or finished")
    job_store_mb: float = Field(512.0, gt=0, description="memory for finished jobs' results")
    job_timeout_s: float = Field(3600.0, gt=0, le=86_400, description="a job's deadline")
    max_queued_passes: int = Field(
        200_000, ge=1, description="heavy passes waiting or running before new heavy work gets 503"
    )
    request_timeout_s: float = Field(30.0, gt=0, le=3600)
    max_upload_mb: float = Field(32.0, gt=0)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_frames: int = Field(64, ge=1)
    max_images_per_request: int = Field(16, ge=1)
    overlay_max_side: int = Field(1024, ge=16, le=16384)
    mask_max_side: int | None = Field(
        None, ge=16, le=16384,
        description="longer side of mask_size=original masks; unset: overlay_max_side",
    )
    max_decoded_mb_per_frame: float = Field(
        100.0, gt=0, description="decoded MB per frame: width x height x the larger of its "
        "bytes per pixel (16-bit channels count 2) and the 3 of the RGB frame it becomes",
    )
    max_decoded_mb_per_request: float = Field(
        512.0, gt=0, description="decoded MB per request, all files and frames together",
    )
    allow_truncated_images: bool = Field(
        False, description="decode image files whose data ends early (the rest padded); off: 415"
    )
    decode_threads: int = Field(
        0, ge=0, description="files decoded at once, across requests; 0 = the cores the process may use"
    )
    max_response_mb: float = Field(
        128.0, gt=0, description="the largest /explain response, estimated before any work is queued"
    )
    png_compress_level: int = Field(3, ge=0, le=9, description="zlib level for returned PNGs")
    api_key: str | None = Field(None, description="Bearer token required on non-public endpoints")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    torch_threads: int = Field(
        0, ge=0, description="intra-op threads per CPU worker; 0 = the cores the process may use"
    )
    warmup: bool = Field(
        True, description="run a forward and a CAM pass per model and batch size before ready"
    )
    channels_last: bool = Field(True, description="NHWC memory format for conv nets (faster on CPU and GPU)")
    gpu_decode: Literal["auto", "off"] = Field(
        "auto", description="auto: on a single CUDA device, baseline JPEGs are decoded (nvjpeg) and resized "
        "on the device; off: every file is decoded on the host"
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="CUDA only: the model's forward under autocast in this dtype, for batches "
        "whose methods keep their maps that way (the others run in float32); CAM maths stays float32, "
        "TF32 stays off"
    )
    fold_batch_norm: bool = Field(
        True, description="compute through a copy of each model with batch norm folded into its convolutions"
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, le=3600, description="on SIGTERM, how long queued and running work may take to finish"
    )
    client_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="per connection: the request head within this, the body "
        "at 1 KiB/s or more over each such window, idle keep-alive and unread responses closed after it"
    )
    max_connections: int = Field(
        1000, ge=1, description="open connections (python -m service); at the bound the longest-idle "
        "one is closed for a new one, or the new one gets 503"
    )
    workers: int = Field(
        0, ge=0, le=64, description="python -m service: front-end processes serving the port, each "
        "with its own engine; 0 = the cores the process may use (at most 8); 1 = one process"
    )
    metrics_require_key: bool = Field(
        False, description="with CAMSERVE_API_KEY set, /metrics needs the key too"
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        devices = [d.strip() for d in value.split(",") if d.strip()]
        if not devices or not all(_DEVICE_RE.match(d) for d in devices):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N (comma-separated), got {value!r}")
        return ",".join(devices)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [o.strip() for o in value.split(",") if o.strip()]
        return value

    @field_validator("dicomweb_url")
    @classmethod
    def _check_dicomweb_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError(f"dicomweb_url must be an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("models_file")
    @classmethod
    def _models_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"models file {value} does not exist")
        return value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def batch_size_for(self, device_type: str) -> int:
        """The largest batch formed for a device of this kind ("cpu", "cuda", ...): the
        explicit setting, else the kind's default."""
        if self.max_batch_size is not None:
            return self.max_batch_size
        return BATCH_DEFAULTS.get(device_type, BATCH_DEFAULTS["cpu"])

    def largest_batch_size(self) -> int:
        """The largest batch any device that ``device`` may resolve to forms (``auto`` may
        be CUDA), for what must be sized before the devices are known (metrics buckets)."""
        kinds: set[str] = set()
        for name in self.device.split(","):
            kinds.update(("cpu", "cuda") if name == "auto" else (name.split(":")[0],))
        return max(self.batch_size_for(kind) for kind in kinds)

    @property
    def mask_side(self) -> int:
        """The longer side of a mask_size=original mask."""
        return self.mask_max_side or self.overlay_max_side


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
