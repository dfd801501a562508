"""Worker configuration: command-line flags with `PLAYREC_*` / `KAFKA_*` environment fallbacks.

Kafka security (SASL/TLS) is passed through to every client the worker opens: faust's own consumer
and producer (as `broker_credentials`) and the plain aiokafka readers/producers.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream.codec import (
    MODEL_UPDATES_TOPIC,
    REPAIRS_TOPIC,
    TRACK_PLAYS_TOPIC,
    TRACK_TAKEDOWNS_TOPIC,
    TRACK_VECTORS_TOPIC,
)
from stream.events import DEAD_LETTER_TOPIC, PLAYS_TOPIC, REPARTITION_TOPIC


class SettingsError(ValueError):
    """The worker cannot start with this configuration."""


#: Shortest accepted admin token.
MIN_ADMIN_TOKEN_CHARS = 16


def read_admin_token(path: Path | None, env_value: str | None) -> str | None:
    """The admin token from a file (first line; preferred: not visible in the process list) or the
    `PLAYREC_ADMIN_TOKEN` value; None when neither is given."""
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError(f"cannot read the admin token file {path}: {exc.strerror}") from None
    return env_value.strip() if env_value else None


@dataclass(frozen=True)
class KafkaSecurity:
    """SASL/TLS settings of the Kafka clients (all optional; PLAINTEXT by default)."""

    protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @classmethod
    def from_env(cls) -> KafkaSecurity:
        env = os.environ
        return cls(
            protocol=env.get("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper(),
            sasl_mechanism=env.get("KAFKA_SASL_MECHANISM"),
            sasl_username=env.get("KAFKA_SASL_USERNAME"),
            sasl_password=env.get("KAFKA_SASL_PASSWORD"),
            ssl_cafile=env.get("KAFKA_SSL_CAFILE"),
            ssl_certfile=env.get("KAFKA_SSL_CERTFILE"),
            ssl_keyfile=env.get("KAFKA_SSL_KEYFILE"),
        )

    def validate(self) -> None:
        if self.protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise SettingsError(
                f"KAFKA_SECURITY_PROTOCOL {self.protocol!r} is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"
            )
        if self.protocol.startswith("SASL") and not (self.sasl_mechanism and self.sasl_username and self.sasl_password):
            raise SettingsError(
                f"{self.protocol} needs KAFKA_SASL_MECHANISM, KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"
            )

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.protocol.endswith("SSL"):
            return None
        context = ssl.create_default_context(cafile=self.ssl_cafile)
        if self.ssl_certfile:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        return context

    def faust_credentials(self) -> Any:
        """`broker_credentials` for faust.App, or None for PLAINTEXT."""
        import faust

        if self.protocol == "PLAINTEXT":
            return None
        if self.protocol == "SSL":
            return faust.SSLCredentials(self.ssl_context())
        return faust.SASLCredentials(
            username=self.sasl_username,
            password=self.sasl_password,
            mechanism=self.sasl_mechanism,
            ssl_context=self.ssl_context(),
        )

    def kafka_python_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python clients (admin, producers, snapshot readers)."""
        if self.protocol == "PLAINTEXT":
            return {}
        return {
            "security_protocol": self.protocol,
            "ssl_context": self.ssl_context(),
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_username,
            "sasl_plain_password": self.sasl_password,
        }

    def aiokafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka clients."""
        if self.protocol == "PLAINTEXT":
            return {}
        kwargs: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol.endswith("SSL"):
            kwargs["ssl_context"] = self.ssl_context()
        if self.protocol.startswith("SASL"):
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        return kwargs


@dataclass(frozen=True)
class Topics:
    """Topic names; `prefix` (default none) separates tenants or test runs on one broker."""

    prefix: str = ""

    @property
    def plays(self) -> str:
        return self.prefix + PLAYS_TOPIC

    @property
    def dead_letter(self) -> str:
        return self.prefix + DEAD_LETTER_TOPIC

    @property
    def repartition(self) -> str:
        return self.prefix + REPARTITION_TOPIC

    @property
    def track_plays(self) -> str:
        return self.prefix + TRACK_PLAYS_TOPIC

    @property
    def track_vectors(self) -> str:
        return self.prefix + TRACK_VECTORS_TOPIC

    @property
    def model_updates(self) -> str:
        return self.prefix + MODEL_UPDATES_TOPIC

    @property
    def track_takedowns(self) -> str:
        return self.prefix + TRACK_TAKEDOWNS_TOPIC

    @property
    def repairs(self) -> str:
        return self.prefix + REPAIRS_TOPIC


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a stream worker needs; see `playrec worker --help` for the meaning of each."""

    bootstrap: str
    store: Path
    port: int = 6066
    host: str = "127.0.0.1"
    bind: str | None = None  # address the HTTP server listens on (default: host)
    app_id: str = "playrec"
    partitions: int = 8
    #: local table state; None: `stream.local_state.default_data_dir(app_id, port)`
    data_dir: Path | None = None
    table_store: str = "memory://"
    min_listeners: int = 5
    max_batch: int = 20_000
    max_latency_s: float = 0.05
    search_k: int | None = None
    session_timeout_s: float = 30.0
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    topics: Topics = field(default_factory=Topics)
    #: Bearer token of the admin routes (anything that changes state); None disables them.
    admin_token: str | None = field(default=None, repr=False)

    def validate(self) -> None:
        if not self.bootstrap:
            raise SettingsError("no Kafka broker: pass --bootstrap host:port or set KAFKA_BOOTSTRAP")
        if not 0 < self.port < 65536:
            raise SettingsError(f"--port must be a TCP port, got {self.port}")
        if self.partitions < 1:
            raise SettingsError(f"--partitions must be >= 1, got {self.partitions}")
        if not 6.0 <= self.session_timeout_s <= 300.0:
            raise SettingsError(
                f"--session-timeout must be 6 to 300 s (the broker's limits), got {self.session_timeout_s}"
            )
        if self.min_listeners < 1:
            raise SettingsError(f"--min-listeners must be >= 1, got {self.min_listeners}")
        token = self.admin_token
        if token is not None and (len(token) < MIN_ADMIN_TOKEN_CHARS or not token.isprintable()):
            raise SettingsError(
                f"the admin token must be at least {MIN_ADMIN_TOKEN_CHARS} printable characters "
                "(e.g. `openssl rand -hex 32`)"
            )
        self.security.validate()

    @property
    def state_dir(self) -> Path:
        """The directory of this worker's local table state."""
        from stream.local_state import default_data_dir

        return self.data_dir if self.data_dir is not None else default_data_dir(self.app_id, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
