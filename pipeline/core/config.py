"""Typed, sectioned configuration.

Resolution order, each layer overriding the one before and each value remembering where it
came from (``likerank config show`` prints both):

1. the defaults below (the same values ``likerank.toml`` in the repository documents);
2. a TOML file: ``--config FILE``, else ``$LIKERANK_CONFIG``, else ``./likerank.toml`` if present;
3. environment variables ``LIKERANK_<SECTION>__<FIELD>`` (e.g. ``LIKERANK_LABELING__GROUP_SIZE``);
4. CLI flags ``--set section.field=value``.

Unknown keys, wrong types and impossible values raise :class:`ConfigError`, whose message
names the key, the layer it came from and the reason, on one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "LIKERANK_"


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible. The message is one line."""

    def __init__(self, key: str, source: str, reason: str):
        self.key, self.source, self.reason = key, source, reason
        super().__init__(f"config error: {key} (from {source}): {reason}")


def doc(text: str, *, secret: bool = False, **kwargs: Any) -> Any:
    """A dataclass field carrying its documentation (shown by ``config show --docs``).

    ``secret=True`` marks a credential: every printed or saved form of the config shows it as
    :data:`REDACTED` (see :meth:`Config.to_dict`).
    """
    # repr=False: a config in a log line, an exception or a traceback never shows a secret.
    return field(metadata={"doc": text, "secret": secret}, repr=not secret, **kwargs)


#: How a secret value appears wherever the config is printed or saved.
REDACTED = "***"


# --------------------------------------------------------------------------- sections


@dataclass
class StorageConfig:
    root: str = doc("Where every table and image lives: a local folder or s3://bucket/prefix.", default="./data")
    endpoint_url: str = doc("S3 endpoint for S3-compatible stores (e.g. http://127.0.0.1:8333); empty = AWS.", default="")
    region: str = doc("S3 region; empty = the AWS chain's default.", default="")
    access_key_id: str = doc("S3 access key; empty = the standard AWS credential chain.", secret=True, default="")
    secret_access_key: str = doc("S3 secret key; empty = the standard AWS credential chain.", secret=True,
                                 default="")
    s3_conditional_put: str = doc("How concurrent table commits stay safe on S3: 'etag' (conditional PUT: AWS S3, "
                                  "SeaweedFS, MinIO, R2) or '' for a store without it, with a locking provider set "
                                  "in the environment (AWS_S3_LOCKING_PROVIDER=dynamodb, DELTA_DYNAMO_TABLE_NAME).",
                                  default="etag")
    retention_hours: float = doc("How long a replaced table file is kept for time travel (`likerank label --as-of`), "
                                 "hours; `likerank compact` vacuums older ones. A forget vacuums its own at once.",
                                 default=168.0)

    def validate(self) -> None:
        if not self.root:
            raise ValueError("root: must not be empty")
        if self.root.startswith("s3://") and len(self.root) <= len("s3://"):
            raise ValueError("root: s3:// needs a bucket name")
        if self.s3_conditional_put not in ("etag", ""):
            raise ValueError(f"s3_conditional_put: 'etag' or '', got {self.s3_conditional_put!r}")
        if self.retention_hours < 0:
            raise ValueError("retention_hours: must be >= 0")


#: The platforms a source can be (one class each under :mod:`pipeline.scrape.sources`).
PLATFORMS = ("mastodon", "bluesky")


@dataclass
class SourceConfig:
    kind: str = doc("'simulator' (the embedded demo world serves every platform) or 'live' (the real services below).",
                    default="simulator")
    platforms: list[str] = doc("Platforms to collect: 'mastodon', 'bluesky'. Each (platform, hashtag) is one scrape task.",
                               default_factory=lambda: ["mastodon", "bluesky"])
    instance_url: str = doc("Mastodon instance base URL, e.g. https://mastodon.social (kind = 'live').", default="")
    hashtags: list[str] = doc("Hashtags to collect, without '#'.", default_factory=lambda: ["selfie"])
    token_env: str = doc("Environment variable holding an optional Mastodon access token (never logged).",
                         default="LIKERANK_SOURCE_TOKEN")
    airflow_conn_id: str = doc("Airflow connection whose password is the Mastodon access token, if set.", default="")
    bluesky_url: str = doc("Bluesky XRPC service the session is created on (your PDS; kind = 'live').",
                           default="https://bsky.social")
    bluesky_identifier_env: str = doc("Environment variable with the Bluesky handle or email to log in with.",
                                      default="LIKERANK_BLUESKY_IDENTIFIER")
    bluesky_password_env: str = doc("Environment variable with a Bluesky app password (never logged or stored).",
                                    default="LIKERANK_BLUESKY_APP_PASSWORD")
    bluesky_airflow_conn_id: str = doc("Airflow connection with the Bluesky login (login) and app password "
                                       "(password), if set.", default="")
    author_key_secret_env: str = doc("Environment variable with the key for pseudonymizing authors.", default="LIKERANK_AUTHOR_KEY")

    def validate(self) -> None:
        if self.kind == "mastodon":
            raise ValueError("kind: 'mastodon' is now 'live' (with platforms = ['mastodon'] to collect Mastodon only)")
        if self.kind not in ("simulator", "live"):
            raise ValueError(f"kind: must be 'simulator' or 'live', got {self.kind!r}")
        unknown = [p for p in self.platforms if p not in PLATFORMS]
        if not self.platforms or unknown or len(set(self.platforms)) < len(self.platforms):
            raise ValueError(f"platforms: a list of distinct platforms out of {', '.join(PLATFORMS)}, got {self.platforms!r}")
        if self.kind == "live" and "mastodon" in self.platforms and not self.instance_url.startswith(("http://", "https://")):
            raise ValueError("instance_url: kind 'live' with platform 'mastodon' needs an http(s) URL")
        if "bluesky" in self.platforms and not self.bluesky_url.startswith(("http://", "https://")):
            raise ValueError("bluesky_url: platform 'bluesky' needs an http(s) URL")
        if not self.hashtags or any(not t or t.startswith("#") for t in self.hashtags):
            raise ValueError("hashtags: need at least one, each without a leading '#'")


@dataclass
class SimulatorConfig:
    seed: int = doc("Seed of the generated world; the same seed gives byte-identical worlds.", default=7)
    posts: int = doc("Number of posts in the world.", default=5000)
    bluesky_share: float = doc("Share of the world's accounts on Bluesky (served over XRPC); the rest are on "
                               "Mastodon.", default=0.4)
    hashtags: list[str] = doc("Hashtags every post carries one of.", default_factory=lambda: ["selfie"])
    rate_limit: int = doc("Requests per 5-minute window per client before 429; 0 = off (Mastodon: 300).", default=0)
    robots_share: float = doc("Share of Mastodon media files the simulator's robots.txt disallows (tenths), so "
                              "make run's funnel shows what robots.txt refuses.", default=0.1)
    tdm_header_share: float = doc("Share of Mastodon media files served with tdm-reservation: 1 (tenths).",
                                  default=0.0)
    tdm_file_share: float = doc("Share of Mastodon media files a /.well-known/tdmrep.json rule reserves (tenths).",
                                default=0.1)
    port: int = doc("Loopback port `make run` serves the simulator on. Keep it fixed: the scrape state "
                    "and the posts' instance URL include it, so a second run resumes instead of re-reading.",
                    default=8765)

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port: must be within 0..65535")
        if self.posts < 1:
            raise ValueError("posts: must be >= 1")
        if self.rate_limit < 0:
            raise ValueError("rate_limit: must be >= 0")
        if not 0.0 <= self.bluesky_share <= 1.0:
            raise ValueError("bluesky_share: must be within 0..1")
        for name in ("robots_share", "tdm_header_share", "tdm_file_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be within 0..1")


@dataclass
class ScrapeConfig:
    max_posts: int = doc("Stop after this many statuses per (instance, hashtag) and run; 0 = no limit.", default=0)
    page_limit: int = doc("Statuses per timeline page (Mastodon allows at most 40).", default=40)
    threads: int = doc("Download threads.", default=16)
    per_host_rps: float = doc("Requests per second per host (token bucket); polite by default: "
                              "Mastodon's API allows 300 requests per 5 minutes.", default=5.0)
    per_host_concurrency: int = doc("Simultaneous requests per host.", default=4)
    connect_timeout_s: float = doc("TCP connect timeout, seconds.", default=5.0)
    read_timeout_s: float = doc("Socket read timeout, seconds.", default=15.0)
    total_timeout_s: float = doc("Whole-download timeout of an image, seconds: every attempt, wait and byte.",
                                 default=60.0)
    api_total_timeout_s: float = doc("Whole-request timeout of an API call (a timeline page, a login, a re-read), "
                                     "seconds: every attempt, wait and byte, checked between the body's chunks. "
                                     "Longer than max_server_wait_s, so the waits that allows fit; a page not "
                                     "read within it ends the (platform, instance, hashtag) run with its state "
                                     "saved.", default=180.0)
    retries: int = doc("Retries on connection errors, 5xx and 429.", default=4)
    backoff_s: float = doc("First retry delay, seconds; doubles each retry, with jitter.", default=0.5)
    max_server_wait_s: float = doc("Longest wait a server may ask for (Retry-After, X-RateLimit-Reset), seconds; "
                                   "a longer one ends the (instance, hashtag) run with its state saved.",
                                   default=120.0)
    max_bytes: int = doc("Largest image body accepted, bytes (enforced while streaming).", default=20_000_000)
    max_api_bytes: int = doc("Largest API response body accepted, bytes (enforced while streaming); a larger "
                             "page ends the (platform, instance, hashtag) run with its state saved. A full "
                             "Mastodon page of 40 statuses is well under 1 MiB.", default=8 * 1024 * 1024)
    max_pixels: int = doc("Largest decoded image accepted, pixels (decompression-bomb guard).", default=40_000_000)
    max_images_per_post: int = doc("Images downloaded per post (the first is the one labeled).", default=1)
    allow_hosts: list[str] = doc("Hosts/IPs exempt from the SSRF guard (tests: 127.0.0.1).", default_factory=list)
    backfill_days: int = doc("Walk older pages down to this many days back; 0 = forward only.", default=0)
    max_attempts: int = doc("Tries of one image URL across scrape runs: a timeout, connection error, 5xx or 429 "
                            "that outlasts the retries, or a host that asked for a wait longer than allowed "
                            "(status 'deferred'), is tried again by a later run until this many tries; 1 = never "
                            "again.", default=5)
    retry_delay_s: float = doc("Delay before a later run tries a failed image URL again, seconds; doubles with each "
                               "try (try n waits retry_delay_s * 2**(n-1)). A deferred URL waits for the server's "
                               "reset instead, when that is later.", default=900.0)
    user_agent: str = doc("User-Agent sent with every request.", default="likerank/0.1 (+https://github.com/likerank/likerank)")
    # Politeness shared by every scrape process (pipeline/scrape/limiter.py).
    limiter_url: str = doc("Where per-host politeness (rate, simultaneous requests, server-imposed pauses) is "
                           "shared by every scrape process and machine: empty = each process keeps its own; "
                           "redis://host:port/db = one Redis for all workers (use a DB number of its own, not "
                           "the Celery broker's).", default="")
    expected_workers: int = doc("Scrape processes expected to run at once. When the shared limiter's Redis "
                                "cannot be reached, each process falls back to per_host_rps and "
                                "per_host_concurrency divided by this number, so together they stay polite.",
                                default=4)
    limiter_lease_s: float = doc("Lifetime of a request slot held in the shared limiter, seconds: the slot of a "
                                 "worker killed mid-request is free again after this long. Longer than "
                                 "total_timeout_s; a live request renews its slot while it waits.", default=90.0)

    def validate(self) -> None:
        if not 1 <= self.page_limit <= 40:
            raise ValueError("page_limit: must be within 1..40 (Mastodon's maximum)")
        for name in ("threads", "per_host_concurrency", "max_images_per_post", "max_bytes", "max_api_bytes",
                     "max_pixels", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        for name in ("per_host_rps", "connect_timeout_s", "read_timeout_s", "total_timeout_s", "api_total_timeout_s",
                     "max_server_wait_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if (self.retries < 0 or self.backoff_s < 0 or self.max_posts < 0 or self.backfill_days < 0
                or self.retry_delay_s < 0):
            raise ValueError("retries, backoff_s, max_posts, backfill_days, retry_delay_s: must be >= 0")
        if self.limiter_url and self.limiter_url.split("://", 1)[0] not in ("redis", "rediss", "unix"):
            raise ValueError(f"limiter_url: empty or a redis://, rediss:// or unix:// URL, got {self.limiter_url!r}")
        if self.expected_workers < 1 or self.limiter_lease_s <= 0:
            raise ValueError("expected_workers: must be >= 1; limiter_lease_s: must be > 0")


@dataclass
class FacesConfig:
    model: str = doc("Face detector: empty = the shipped SCRFD-500MF; an insightface pack name (buffalo_l, "
                     "buffalo_sc, ...: downloaded to ~/.insightface/models on first use); or a path to an "
                     "SCRFD .onnx file or model-pack folder.", default="")
    providers: list[str] = doc("onnxruntime execution providers, in order of preference.",
                               default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    det_size: int = doc("Detector input size, pixels (square).", default=640)
    fallback_det_size: int = doc("Second, smaller input size tried when the first finds no face; 0 = off.", default=320)
    det_thresh: float = doc("Detector score threshold.", default=0.5)
    threads: int = doc("onnxruntime intra-op threads per inference call; CPU runs cores/threads calls at "
                       "once. 1 measured fastest for SCRFD on CPU (bench/faces.py); 0 = onnxruntime's "
                       "default, one call at a time.", default=1)
    decode_workers: int = doc("Image-decoding threads feeding the detector.", default=2)
    shard_size: int = doc("Images per shard (one mapped Airflow task each).", default=500)
    min_faces: int = doc("Label filter: fewest faces a photo must have.", default=1)
    max_faces: int = doc("Label filter: most faces allowed; 0 = no limit (1 = exactly-one-face dataset).", default=0)
    min_face_share: float = doc("Label filter: smallest largest-face area / image area.", default=0.0)
    min_score: float = doc("Label filter: a face counts only at this detector score or above.", default=0.5)
    queue: str = doc("Airflow queue of the detection shards. Under the CeleryExecutor a worker must listen "
                     "on it (infra/compose.yaml: the GPU worker); the local executors ignore it; "
                     "empty = Airflow's default queue.", default="gpu")
    pool: str = doc("Airflow pool for detection tasks; empty = default.", default="")
    kubernetes_gpus: int = doc("GPUs (nvidia.com/gpu) each detection shard's pod requests under the "
                               "Kubernetes executor (a pod_override); 0 = no override.", default=0)

    def validate(self) -> None:
        if self.det_size < 32 or self.fallback_det_size < 0:
            raise ValueError("det_size: must be >= 32; fallback_det_size >= 0")
        if not 0 <= self.det_thresh <= 1 or not 0 <= self.min_score <= 1:
            raise ValueError("det_thresh, min_score: must be within 0..1")
        if self.min_faces < 0 or self.max_faces < 0 or self.kubernetes_gpus < 0:
            raise ValueError("min_faces, max_faces, kubernetes_gpus: must be >= 0")
        if self.max_faces and self.max_faces < self.min_faces:
            raise ValueError("max_faces: must be >= min_faces (or 0 for no limit)")
        if not 0 <= self.min_face_share <= 1:
            raise ValueError("min_face_share: must be within 0..1")
        if self.shard_size < 1 or self.decode_workers < 1 or self.threads < 0:
            raise ValueError("shard_size, decode_workers: must be >= 1; threads >= 0")
        if not self.providers:
            raise ValueError("providers: need at least one")


@dataclass
class LabelingConfig:
    labeler: str = doc("'groups' (the rule) or a comparison: 'median_likes', 'ratio', 'residual'.", default="groups")
    group_size: int = doc("Posts per exposure group; even, >= 2 (top half positive).", default=100)
    min_age_days: float = doc("Likes count only if observed at this post age or later, days.", default=30.0)
    min_followers: int = doc("Fewest author followers kept (inclusive).", default=50)
    max_followers: int = doc("Most author followers kept (inclusive).", default=500_000)
    max_tags: int = doc("Most tags a kept post may carry (the queried tag included).", default=8)
    tag_bonus: float = doc("Exposure bonus per tag beyond the first: followers * (1 + bonus * extra_tags).", default=0.05)
    val_fraction: float = doc("Share of authors in the validation split.", default=0.1)
    test_fraction: float = doc("Share of authors in the test split.", default=0.1)
    split_salt: str = doc("Salt of the author hash that assigns splits (change to reshuffle).", default="likerank")
    max_group_exposure_ratio: float = doc(
        "Flag a group whose highest exposure is more than this many times its lowest (its label then "
        "tracks audience size more than the photo); 0 = off, as the rule has it.", default=0.0)
    drop_wide_groups: bool = doc("Drop the groups max_group_exposure_ratio flags instead of only "
                                 "naming them in the run's summary.", default=False)

    def validate(self) -> None:
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size: must be even and >= 2, got {self.group_size}")
        if self.labeler not in ("groups", "median_likes", "ratio", "residual"):
            raise ValueError(f"labeler: unknown {self.labeler!r}")
        if self.min_age_days < 0 or self.min_followers < 0 or self.max_tags < 1 or self.tag_bonus < 0:
            raise ValueError("min_age_days, min_followers, tag_bonus: must be >= 0; max_tags >= 1")
        if self.max_followers < self.min_followers:
            raise ValueError("max_followers: must be >= min_followers")
        if self.max_group_exposure_ratio < 0 or 0 < self.max_group_exposure_ratio < 1:
            raise ValueError("max_group_exposure_ratio: must be 0 (off) or >= 1")
        if self.val_fraction < 0 or self.test_fraction < 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction, test_fraction: must be >= 0 and sum below 1")


@dataclass
class ValidationConfig:
    min_rows: int = doc("Fewest label rows a run must have to be published.", default=100)
    data_docs: bool = doc("Render Great Expectations Data Docs HTML beside the result.", default=True)

    def validate(self) -> None:
        if self.min_rows < 0:
            raise ValueError("min_rows: must be >= 0")


@dataclass
class TrainingConfig:
    backbone: str = doc("torchvision backbone: resnet18, resnet50 or vgg16.", default="resnet18")
    weights: str = doc("Backbone start: 'imagenet' (torchvision's cache, else downloaded; offline and uncached: "
                       "from scratch, said in one line), 'none' (from scratch), or a path to a state-dict file.",
                       default="imagenet")
    image_size: int = doc("Square input size, pixels.", default=224)
    crop: str = doc("'face' (largest face box plus margin) or 'full' (whole image squished to a square).", default="face")
    face_margin: float = doc("Margin around the face box, as a fraction of its size.", default=0.6)
    score_head: bool = doc("Also regress the within-group score.", default=True)
    epochs: int = doc("Training epochs.", default=3)
    batch_size: int = doc("Global batch size (split across processes).", default=32)
    grad_accum: int = doc("Gradient accumulation steps.", default=1)
    lr: float = doc("Learning rate (AdamW).", default=3e-4)
    weight_decay: float = doc("AdamW weight decay.", default=1e-4)
    workers: int = doc("DataLoader worker processes per rank.", default=2)
    nproc: int = doc("Processes per node for the local launcher (torchrun --nproc_per_node).", default=1)
    backend: str = doc("Launcher: 'local' (torchrun here) or 'kubernetes' (Kubeflow PyTorchJob).", default="local")
    seed: int = doc("Base random seed (each rank adds its rank).", default=0)
    queue: str = doc("Airflow queue of the `retrain` DAG's launch task (torchrun runs inside it with the "
                     "local backend). Under the CeleryExecutor a worker must listen on it; the local "
                     "executors ignore it; empty = Airflow's default queue.", default="train")
    image: str = doc("Container image for the kubernetes backend.", default="ghcr.io/likerank/likerank:latest")
    namespace: str = doc("Kubernetes namespace.", default="default")
    replicas: int = doc("Kubernetes worker replicas.", default=2)
    gpus_per_replica: int = doc("GPUs per replica (kubernetes).", default=1)
    storage_secret: str = doc("Kubernetes secret holding the storage credentials.", default="likerank-storage")
    input: str = doc("Where training reads images: 'objects' (one read from the image store per image) or "
                     "'shards' (the tar shards of `likerank export RUN --format webdataset`, at training.shards: "
                     "sequential reads, the way to feed a GPU from S3).", default="objects")
    shards: str = doc("Folder or s3:// URI of a webdataset export of the published run (training.input = 'shards'), "
                      "reached with the [storage] endpoint and credentials; empty = <storage root>/exports/<run>/webdataset.",
                      default="")
    shuffle_buffer: int = doc("Samples each DataLoader worker holds to shuffle shard input (training.input = "
                              "'shards'), seeded by training.seed and the epoch; 0 or 1 = shard order only.",
                              default=1000)
    truth_file: str = doc("Ground-truth Parquet (post_id, quality; the simulator writes one): adds ROC-AUC "
                          "against true quality to the metrics; empty = none.", default="")

    def validate(self) -> None:
        if self.backbone not in ("resnet18", "resnet50", "vgg16"):
            raise ValueError(f"backbone: unknown {self.backbone!r}")
        if self.crop not in ("face", "full"):
            raise ValueError("crop: must be 'face' or 'full'")
        if self.backend not in ("local", "kubernetes"):
            raise ValueError("backend: must be 'local' or 'kubernetes'")
        if self.input not in ("objects", "shards"):
            raise ValueError("input: must be 'objects' or 'shards'")
        if self.shuffle_buffer < 0:
            raise ValueError("shuffle_buffer: must be >= 0")
        for name in ("image_size", "epochs", "batch_size", "grad_accum", "nproc", "replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if self.lr <= 0 or self.workers < 0 or self.gpus_per_replica < 0 or self.face_margin < 0:
            raise ValueError("lr: must be > 0; workers, gpus_per_replica, face_margin >= 0")


@dataclass
class ExportConfig:
    shard_size: int = doc("Samples per tar shard of a webdataset export (`likerank export`).", default=1000)

    def validate(self) -> None:
        if self.shard_size < 1:
            raise ValueError("shard_size: must be >= 1")


@dataclass
class ServeConfig:
    max_concurrent: int = doc("Requests decoded, detected and scored at once by `likerank serve`; one more "
                              "is answered 503 with Retry-After (uploads still arriving do not count).",
                              default=16)
    max_connections: int = doc("Open connections plus running requests; past it uvicorn answers 503 at once "
                               "(its limit_concurrency).", default=128)
    max_buffered_bytes: int = doc("Upload bytes held in memory across all requests at once, bytes (each upload "
                                  "is also capped by scrape.max_bytes); a request that would pass it gets 503.",
                                  default=200_000_000)
    head_timeout_s: float = doc("A request's line and headers must arrive within this many seconds of the "
                                "connection opening or of the previous response, else the connection is closed.",
                                default=10.0)
    body_timeout_s: float = doc("An upload must arrive whole within this many seconds of its headers, else "
                                "408 and the connection is closed.", default=10.0)
    keep_alive_s: int = doc("An idle kept-alive connection is closed after this many seconds (uvicorn's "
                            "timeout_keep_alive).", default=5)
    batch_max: int = doc("Most crops in one model call: the crops of requests arriving together are scored "
                         "in one batch (a request's own batch, e.g. its best-crop grid, is never split).",
                         default=128)
    batch_wait_ms: float = doc("How long a model call waits for more requests to join it, milliseconds.",
                               default=5.0)
    retry_after_s: int = doc("Seconds a busy answer (503) asks the client to wait (Retry-After).", default=1)
    token_env: str = doc("Environment variable with the bearer token clients must send "
                         "(Authorization: Bearer <token>); required to listen beyond loopback. Never logged.",
                         default="LIKERANK_SERVE_TOKEN")

    def validate(self) -> None:
        for name in ("max_concurrent", "max_connections", "max_buffered_bytes", "keep_alive_s", "batch_max",
                     "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        for name in ("head_timeout_s", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0")
        if self.batch_wait_ms < 0:
            raise ValueError("batch_wait_ms: must be >= 0")
        if self.max_connections <= self.max_concurrent:
            raise ValueError("max_connections: must be > max_concurrent (connections also wait for uploads)")
        if not self.token_env:
            raise ValueError("token_env: must name an environment variable")


@dataclass
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)
    scrape: ScrapeConfig = field(default_factory=ScrapeConfig)
    faces: FacesConfig = field(default_factory=FacesConfig)
    labeling: LabelingConfig = field(default_factory=LabelingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    #: "section.field" -> where its value came from ("default", "file <path>", "env VAR", "flag").
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self, *, redact: bool = True) -> dict[str, dict[str, Any]]:
        """Every section's values; secrets set to a value show as ``***`` unless ``redact=False``.

        The one redaction: ``config show``, the configs saved beside outputs and the metrics
        all go through here.
        """
        out = {s.name: dataclasses.asdict(getattr(self, s.name)) for s in _sections()}
        if redact:
            for section, name in secret_fields():
                if out[section][name]:
                    out[section][name] = REDACTED
        return out

    def section_hash(self, section: str) -> str:
        """Stable short hash of one section's values (e.g. the labeling parameter set)."""
        blob = json.dumps(dataclasses.asdict(getattr(self, section)), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_toml(self) -> str:
        """The resolved config as TOML (secrets redacted), saved next to every output it produced."""
        lines: list[str] = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)


# --------------------------------------------------------------------------- loading


def _sections() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Config) if f.name != "origins"]


def secret_fields() -> list[tuple[str, str]]:
    """(section, field) of every config field marked ``secret``."""
    sections = typing.get_type_hints(Config)
    return [(s.name, f.name) for s in _sections() for f in dataclasses.fields(sections[s.name])
            if f.metadata.get("secret")]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _field_type(section_cls: type, name: str) -> Any:
    return typing.get_type_hints(section_cls)[name]


def _coerce(value: Any, typ: Any, *, from_text: bool) -> Any:
    """Check (file values) or parse (env/flag text) one value against its declared type."""
    origin = typing.get_origin(typ)
    if origin in (list, types.GenericAlias) or origin is list:
        (item_t,) = typing.get_args(typ)
        if from_text:
            text = str(value).strip()
            if text.startswith("["):
                value = tomllib.loads(f"v = {text}")["v"]
            else:
                value = [p.strip() for p in text.split(",") if p.strip()]
        if not isinstance(value, list):
            raise TypeError(f"expected a list of {item_t.__name__}, got {type(value).__name__}")
        return [_coerce(v, item_t, from_text=False) for v in value]
    if typ is bool:
        if from_text:
            low = str(value).strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise TypeError(f"expected a boolean (true/false), got {value!r}")
        if not isinstance(value, bool):
            raise TypeError(f"expected a boolean, got {type(value).__name__} {value!r}")
        return value
    if typ is int:
        if from_text:
            try:
                return int(str(value).strip().replace("_", ""))
            except ValueError:
                raise TypeError(f"expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if typ is float:
        if from_text:
            try:
                return float(str(value).strip())
            except ValueError:
                raise TypeError(f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if typ is str:
        if from_text:
            return str(value)
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {typ!r}")


def _apply(cfg: Config, section: str, key: str, value: Any, source: str, *, from_text: bool) -> None:
    sections = {s.name: s for s in _sections()}
    dotted = f"{section}.{key}"
    if section not in sections:
        raise ConfigError(dotted, source, f"unknown section {section!r} (known: {', '.join(sections)})")
    obj = getattr(cfg, section)
    names = [f.name for f in dataclasses.fields(obj)]
    if key not in names:
        raise ConfigError(dotted, source, f"unknown key in [{section}] (known: {', '.join(names)})")
    try:
        setattr(obj, key, _coerce(value, _field_type(type(obj), key), from_text=from_text))
    except TypeError as exc:
        raise ConfigError(dotted, source, str(exc)) from None
    cfg.origins[dotted] = source


def default_config_path() -> Path | None:
    env = os.environ.get(ENV_PREFIX + "CONFIG")
    if env:
        return Path(env)
    local = Path("likerank.toml")
    return local if local.is_file() else None


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Resolve the config: defaults < TOML file < environment < ``--set`` flags."""
    cfg = Config()
    for s in _sections():
        for f in dataclasses.fields(getattr(cfg, s.name)):
            cfg.origins[f"{s.name}.{f.name}"] = "default"

    file = Path(path) if path else default_config_path()
    if file is not None:
        source = f"file {file}"
        try:
            data = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError("-", source, "file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("-", source, f"not valid TOML: {exc}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(section, source, "expected a [section] table")
            for key, value in values.items():
                _apply(cfg, section, key, value, source, from_text=False)

    env = os.environ if env is None else env
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or "__" not in var[len(ENV_PREFIX):]:
            continue
        section, key = var[len(ENV_PREFIX):].lower().split("__", 1)
        _apply(cfg, section, key, env[var], f"env {var}", from_text=True)

    for item in overrides or []:
        dotted, sep, value = item.partition("=")
        section, dot, key = dotted.strip().partition(".")
        if not sep or not dot:
            raise ConfigError(item, "flag --set", "expected section.field=value")
        _apply(cfg, section, key, value, f"flag --set {dotted.strip()}", from_text=True)

    for s in _sections():
        try:
            getattr(cfg, s.name).validate()
        except ValueError as exc:
            key, _, reason = str(exc).partition(": ")
            first = key.split(",")[0].strip()
            dotted = f"{s.name}.{first}"
            raise ConfigError(dotted, cfg.origins.get(dotted, "default"), reason or str(exc)) from None
    return cfg


def describe(cfg: Config, *, docs: bool = False) -> str:
    """Human-readable resolved config: value and origin of every key."""
    out: list[str] = []
    for s in _sections():
        out.append(f"[{s.name}]")
        values = cfg.to_dict()[s.name]
        for f in dataclasses.fields(getattr(cfg, s.name)):
            shown = REDACTED if f.metadata.get("secret") and values[f.name] else _toml_value(values[f.name])
            out.append(f"{f.name} = {shown}    # {cfg.origins.get(f'{s.name}.{f.name}', 'default')}")
            if docs:
                out.append(f"    ({f.metadata.get('doc', '')})")
        out.append("")
    return "\n".join(out)
