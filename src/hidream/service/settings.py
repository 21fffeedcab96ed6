"""All service settings in one place: `HIDREAM_*` environment variables, overridden by CLI flags."""

from __future__ import annotations

import os
import secrets
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hidream.engine.errors import InvalidRequestError
from hidream.service.errors import ServiceError

DEFAULT_MODEL_IDS = ("hidream-o1-image",)
# The hosted service's ids, so its clients work unchanged.
DEFAULT_ALIASES = {"hidream-o1-1.5": "hidream-o1-image", "hidream-ai/hidream-o1-1.5": "hidream-o1-image"}


PRECISIONS = ("bf16", "bf16-fp32acc", "fp32")
DTYPES = ("bf16", "fp16", "fp32")  # the choices of the deprecated --dtype / HIDREAM_DTYPE; fp16 is refused
FP16_REFUSED = "fp16 is not supported: Qwen3 activations overflow float16; use --precision bf16"
QUANTIZE = ("none", "fp8")  # fp8: the weights quantized to float8 at load (a file of fp8 weights is fp8 anyway)
OFFLOAD = ("none", "layers", "auto")  # layers: decoder layers streamed from host memory; auto: when they do not fit
CHECKPOINT_HELP = "checkpoint directory in the official layout, or a single .safetensors file"


def precision_of(precision: str | None, dtype: str | None) -> str | None:
    """The precision mode asked for: `precision`, else the deprecated `dtype` (bf16 or fp32); None: the
    device's default. InvalidRequestError naming "dtype" (fp16, unknown, or at odds with precision) or
    "precision" (unknown) otherwise."""
    if dtype == "fp16" or precision == "fp16":
        raise InvalidRequestError("dtype" if dtype == "fp16" else "precision", FP16_REFUSED)
    if dtype is not None and dtype not in DTYPES:
        raise InvalidRequestError("dtype", f"must be bf16 or fp32 (deprecated: use --precision; got {dtype!r})")
    if precision is not None and precision not in PRECISIONS:
        raise InvalidRequestError("precision", f"must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if dtype is not None and precision is not None and dtype != precision:
        raise InvalidRequestError("dtype", f"deprecated, and at odds with --precision {precision}; leave it out")
    return precision or dtype


def choice_problem(value: str | None, choices: tuple[str, ...]) -> str | None:
    """The rule `value` breaks, or None when it is one of `choices` (None: not set)."""
    if value is None or value in choices:
        return None
    return f"must be one of {', '.join(choices)} (got {value!r})"


def default_home() -> Path:
    return Path(os.environ.get("HIDREAM_HOME") or Path.home() / ".cache" / "hidream")


@dataclass(frozen=True)
class Settings:
    """Read once at start-up and passed down; nothing reads the environment after that."""

    home: Path = field(default_factory=default_home)
    model: str | None = None  # checkpoint directory or single .safetensors file; None: the demo model
    variant: str | None = None  # full | dev; None: from the checkpoint's name
    device: str | None = None
    dtype: str | None = None  # deprecated spelling of precision: bf16 | fp32 (fp16 is refused)
    precision: str | None = None  # bf16 | bf16-fp32acc | fp32; None: bf16 on CUDA, fp32 on the CPU
    compile: bool = False  # regional torch.compile of the decoder layer
    quantize: str = "none"  # none | fp8: the weights quantized to fp8 at load
    offload: str = "none"  # none | layers | auto: decoder layers streamed from host memory
    tokenizer: Path | None = None  # tokenizer and image-processor files, for a single file that has none
    model_ids: tuple[str, ...] = DEFAULT_MODEL_IDS
    aliases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None  # default http://host:port
    database_url: str | None = None  # default sqlite under home
    storage_dir: Path | None = None  # default home/storage
    storage_url: str | None = None  # s3://bucket/optional/prefix; None: the local directory (storage_dir)
    s3_endpoint_url: str | None = None  # e.g. http://minio:9000; None: AWS S3
    s3_region: str | None = None
    s3_access_key_id: str | None = None  # None (both): boto3's default credential chain
    s3_secret_access_key: str | None = field(default=None, repr=False)  # kept out of logged reprs
    secret: str | None = None  # signs file URLs; default: generated once under home
    price_usd: float = 0.044
    max_body_bytes: int = 64 * 1024 * 1024
    max_upload_bytes: int = 20 * 1024 * 1024
    max_upload_pixels: int = 40_000_000
    max_queue: int = 100
    sync_timeout_s: float = 300.0
    lease_s: float = 30.0
    max_attempts: int = 3
    url_ttl_s: int = 24 * 3600
    fetch_timeout_s: float = 10.0
    fetch_allow: tuple[str, ...] = ()
    worker: bool = True  # `serve` runs an in-process worker
    rate_per_minute: int = 0  # submits per API key per rolling minute (0: no limit); `hidream keys limits` per key
    max_concurrent: int = 0  # tasks per API key queued or running at once (0: no limit)
    preview_every: int = 5  # a low-resolution preview every N steps for the progress stream (0: none)
    preview_size: int = 256  # the preview's longer side, in pixels
    webhook_timeout_s: float = 10.0  # per delivery attempt
    webhook_retry_s: float = 10.0  # the first retry's delay; it doubles each time (at most 10 minutes)
    webhook_give_up_s: float = 3600.0  # no attempt starts later than this after the prediction ended
    lora_dir: Path | None = None  # the LoRAs a request may name (.safetensors files); None: none served
    lora_urls: bool = False  # requests may also give https URLs of LoRAs (fetched at submit, cached by sha256)
    lora_max_bytes: int = 2_000_000_000  # the largest LoRA download
    lora_cache_bytes: int = 2 * 1024**3  # the worker's LRU of parsed LoRAs (engine.lora_cache.max_bytes)
    refine_url: str | None = None  # an OpenAI-compatible chat endpoint for refine_prompt; None: refused
    refine_model: str | None = None  # the model named in its requests; None: left out
    refine_key: str | None = field(default=None, repr=False)  # its Bearer token
    refine_timeout_s: float = 30.0
    tls_cert: Path | None = None  # a PEM certificate chain: serve https directly (with tls_key)
    tls_key: Path | None = None  # its PEM private key

    @property
    def refiner(self):
        """The prompt refiner's configuration (hidream.refine.RefinerConfig), or None when none is set."""
        from hidream.refine import RefinerConfig

        if not self.refine_url:
            return None
        return RefinerConfig(self.refine_url, self.refine_model or None, self.refine_key or None,
                             self.refine_timeout_s)

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return (self.public_url or f"{scheme}://{self.host}:{self.port}").rstrip("/")

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'hidream.db'}"

    @property
    def files_dir(self) -> Path:
        return self.storage_dir or self.home / "storage"

    @property
    def lora_cache_dir(self) -> Path:
        """Where LoRAs downloaded from URLs are kept on this machine, named by their content's sha256."""
        return self.home / "lora-cache"

    def signing_secret(self) -> str:
        """The configured secret, else one generated on first use and kept under home."""
        if self.secret:
            return self.secret
        path = self.home / "secret"
        if not path.is_file():
            self.home.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32))
            path.chmod(0o600)
        return path.read_text().strip()

    @property
    def served_variant(self) -> str:
        """full or dev: --variant, else detected from the checkpoint (a directory's name; a single file's
        metadata or name), as the engine does; the demo model: full."""
        from hidream.engine.config import detect_variant

        if self.variant is not None:
            return self.variant
        return detect_variant(Path(self.model).expanduser()) if self.model else "full"

    @property
    def demo_world(self) -> dict | None:
        """What the served demo model knows (its description file), or None when the checkpoint is another."""
        from hidream.data import demo_world

        return demo_world(self.model)

    @property
    def recipe_defaults(self) -> tuple[int, float]:
        """(steps, guidance) when a request leaves them out: the served variant's official recipe."""
        return (28, 1.0) if self.served_variant == "dev" else (50, 5.0)

    def recipe_scheduler(self, num_references: int) -> str:
        """The scheduler the served recipe uses for a mode when a request asks for none."""
        from hidream.engine.config import recipe_for

        return recipe_for("dev" if self.served_variant == "dev" else "full", num_references).scheduler

    def resolve_model_id(self, name: str) -> str | None:
        """The served id a client's model name maps to, or None."""
        if name in self.model_ids:
            return name
        return self.aliases.get(name)


# name -> (environment variable, parser). Every setting has one.
def _tuple(v: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in v.split(",") if x.strip())


def _aliases(v: str) -> dict[str, str]:
    out = {}
    for pair in _tuple(v):
        alias, _, target = pair.partition("=")
        if not target:
            raise ValueError(f"{pair!r} is not alias=id")
        out[alias.strip()] = target.strip()
    return out


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _one_of(choices: tuple[str, ...]):
    """A parser that takes one of `choices` (any case); its error says them: `must be one of none, fp8`."""

    def parse(v: str) -> str:
        if v.strip().lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return v.strip().lower()

    return parse


PARSERS: dict[str, Any] = {
    "home": Path, "model": str, "variant": str, "device": str, "dtype": str, "precision": str, "compile": _bool,
    "quantize": _one_of(QUANTIZE), "offload": _one_of(OFFLOAD), "tokenizer": Path,
    "model_ids": _tuple, "aliases": _aliases, "host": str, "port": int, "public_url": str,
    "database_url": str, "storage_dir": Path, "storage_url": str, "s3_endpoint_url": str, "s3_region": str,
    "s3_access_key_id": str, "s3_secret_access_key": str, "secret": str, "price_usd": float,
    "max_body_bytes": int, "max_upload_bytes": int, "max_upload_pixels": int, "max_queue": int,
    "sync_timeout_s": float, "lease_s": float, "max_attempts": int, "url_ttl_s": int,
    "fetch_timeout_s": float, "fetch_allow": _tuple, "worker": _bool,
    "rate_per_minute": int, "max_concurrent": int, "preview_every": int, "preview_size": int,
    "webhook_timeout_s": float, "webhook_retry_s": float, "webhook_give_up_s": float,
    "lora_dir": Path, "lora_urls": _bool, "lora_max_bytes": int, "lora_cache_bytes": int,
    "refine_url": str, "refine_model": str, "refine_key": str, "refine_timeout_s": float,
    "tls_cert": Path, "tls_key": Path,
}
ENV_NAMES = {name: "HIDREAM_" + ("MODEL_ALIASES" if name == "aliases" else name.upper()) for name in PARSERS}

# name -> what the setting means, for `--help` (see `help_text`); every setting has one.
HELP: dict[str, str] = {
    "home": "directory of the SQLite database, the stored files and the signing secret",
    "model": CHECKPOINT_HELP,
    "variant": "recipe: full or dev",
    "device": "cuda, cuda:N or cpu",
    "dtype": "deprecated: use precision; bf16 or fp32 (fp16 is refused: Qwen3 activations overflow it)",
    "precision": "bf16 (weights and activations), bf16-fp32acc (bf16 matmuls on a float32 residual stream, "
                 "float32 norms; more detail, more memory) or fp32",
    "compile": "torch.compile the decoder layer (regional): faster steps after a warm-up per image size",
    "quantize": "none, or fp8: the weights quantized to float8 at load (about half the memory of bf16; a file "
                "of fp8 weights loads as fp8 whatever this says)",
    "offload": "none; layers: the decoder layers streamed from host memory (a GPU smaller than the model, "
               "slower steps); auto: layers only when the model does not fit the GPU",
    "tokenizer": "directory of the tokenizer and image-processor files, for a single .safetensors file that "
                 "carries none",
    "model_ids": "the model ids served (comma-separated); requests name one of them",
    "aliases": "other model names accepted, as alias=id pairs (comma-separated)",
    "host": "address the API listens on (0.0.0.0: every interface)",
    "port": "TCP port the API listens on",
    "public_url": "the API's address as clients reach it; file URLs are built on it",
    "database_url": "SQLAlchemy URL of the database shared by the API and the workers "
                    "(sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB)",
    "storage_dir": "directory of the images and references, when the storage is local",
    "storage_url": "s3://BUCKET/OPTIONAL/PREFIX: keep the images in S3 or an S3-compatible store",
    "s3_endpoint_url": "the S3 endpoint, e.g. http://minio:9000",
    "s3_region": "the S3 region",
    "s3_access_key_id": "the S3 access key id (with HIDREAM_S3_SECRET_ACCESS_KEY)",
    "s3_secret_access_key": "the S3 secret access key",
    "secret": "signs file URLs and derives each key's webhook secret",
    "price_usd": "price of one image in the usage records, in USD",
    "max_body_bytes": "largest request body accepted, in bytes",
    "max_upload_bytes": "largest uploaded or fetched image, in bytes",
    "max_upload_pixels": "most pixels an uploaded or fetched image may decode to",
    "max_queue": "most tasks waiting or running; a submit beyond it is refused (429)",
    "sync_timeout_s": "how long a synchronous request waits for its images, in seconds",
    "lease_s": "a running task's lease, in seconds: a worker that stops renewing it loses the task to another; "
               "workers beat every third of it",
    "max_attempts": "attempts of a task whose worker died or lost its lease, before it fails",
    "url_ttl_s": "how long a file URL stays valid, in seconds",
    "fetch_timeout_s": "timeout fetching a reference image or checking a webhook URL, in seconds",
    "fetch_allow": "non-public networks (CIDRs, comma-separated) reference and webhook URLs may reach",
    "worker": "run a worker in the `serve` process",
    "rate_per_minute": "submits per API key per rolling minute (0: no limit); per key: hidream keys limits",
    "max_concurrent": "tasks per API key queued or running at once (0: no limit); per key: hidream keys limits",
    "preview_every": "a low-resolution preview every N steps in the progress stream (0: none)",
    "preview_size": "the preview's longer side, in pixels",
    "webhook_timeout_s": "timeout of one webhook delivery attempt, in seconds",
    "webhook_retry_s": "delay of the first webhook retry, in seconds; it doubles each time (at most 10 minutes)",
    "webhook_give_up_s": "no webhook attempt starts later than this after the prediction ended, in seconds",
    "lora_dir": "directory of the LoRA .safetensors files requests may name in `loras` (GET /api/v1/loras lists "
                "it); every worker needs the same files",
    "lora_urls": "requests may also give https URLs of LoRAs, downloaded at submit (public addresses only) and "
                 "cached by content hash",
    "lora_max_bytes": "largest LoRA download from a URL, in bytes",
    "lora_cache_bytes": "bytes of parsed LoRAs a worker keeps in memory (least recently used dropped first)",
    "refine_url": "an OpenAI-compatible chat endpoint (base URL, e.g. http://127.0.0.1:8080/v1, or its "
                  "/chat/completions address) that rewrites prompts for refine_prompt",
    "refine_model": "the model the refiner's requests name",
    "refine_key": "the refiner's API key (sent as a Bearer token)",
    "refine_timeout_s": "how long a refinement may take, in seconds, before the prompt is used as given",
    "tls_cert": "a PEM certificate (chain) file: serve https directly, with --tls-key (else plain http, for a "
                "reverse proxy in front)",
    "tls_key": "the PEM private key file of --tls-cert",
}
# Defaults that are not a plain value of `Settings`.
_DEFAULT_SHOWN = {
    "home": "$HOME/.cache/hidream", "model": "the demo model shipped in the package (coloured shapes only)",
    "variant": "from the checkpoint: a name ending in -Dev, or a single file's metadata", "device": "cuda when present, else cpu",
    "dtype": "none: see precision", "precision": "bf16 on CUDA, fp32 on CPU",
    "public_url": "http://HOST:PORT (https with --tls-cert)",
    "database_url": "sqlite:///HOME/hidream.db",
    "storage_dir": "HOME/storage", "storage_url": "the local directory, HIDREAM_STORAGE_DIR",
    "s3_endpoint_url": "AWS S3", "s3_region": "boto3's", "s3_access_key_id": "boto3's default credentials",
    "s3_secret_access_key": "boto3's default credentials", "secret": "generated once, kept in HOME/secret",
    "fetch_allow": "none", "tokenizer": "the checkpoint's own",
    "lora_dir": "none: no LoRAs served", "lora_max_bytes": "2000000000 (2 GB)",
    "lora_cache_bytes": "2147483648 (2 GiB)",
    "refine_url": "none: refine_prompt is refused", "refine_model": "none: left out of the request",
    "refine_key": "none",
    "tls_cert": "none: plain http", "tls_key": "none",
}


def shown_default(name: str) -> str:
    """A setting's built-in default, as `--help` shows it."""
    if name in _DEFAULT_SHOWN:
        return _DEFAULT_SHOWN[name]
    value = next(f for f in fields(Settings) if f.name == name)
    value = value.default_factory() if value.default_factory is not MISSING else value.default
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def help_text(name: str) -> str:
    """`meaning (default: X; env HIDREAM_X)`, escaped for argparse."""
    return f"{HELP[name]} (default: {shown_default(name)}; env {ENV_NAMES[name]})".replace("%", "%%")


def load_settings(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, then `overrides` (CLI flags; None means not given)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        raw = env.get(ENV_NAMES[f.name])
        if raw is not None and raw != "":
            try:
                values[f.name] = PARSERS[f.name](raw)
            except (ValueError, TypeError) as err:
                raise ServiceError(f"{ENV_NAMES[f.name]}: cannot use {raw!r} ({err})") from err
    settings = Settings(**values)
    given = {k: v for k, v in overrides.items() if v is not None}
    return replace(settings, **given) if given else settings
