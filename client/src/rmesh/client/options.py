"""How the client reaches the router: address, API key, TLS, deadline and retries."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import grpc

ROUTER_SERVICE = "rmesh.api.router.v1.RouterService"
REVIEW_SERVICE = "rmesh.api.review.v1.ReviewService"
# The router's default message limit; requests larger than this are refused by the server.
DEFAULT_MAX_MESSAGE_BYTES = 1 * 1024 * 1024
MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC's own ceiling


@dataclass(frozen=True)
class ClientOptions:
    address: str = "127.0.0.1:50051"
    # Sent as "authorization: Bearer KEY" on every call.
    api_key: str = field(default="", repr=False)
    # TLS: on when ``tls`` is true or any PEM below is given; the system roots when none is.
    tls: bool = False
    root_certificates: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)  # with certificate_chain: mutual TLS
    certificate_chain: bytes | None = None
    # Overrides the name checked against the server's certificate (tests, IP addresses).
    server_name: str = ""
    # Seconds each call may take unless the call gives its own.
    timeout: float = 300.0
    # Attempts per call on UNAVAILABLE, by gRPC's own retry (1 turns retries off). A Solve is
    # retried only before its first event arrives, so an accepted request never runs twice.
    max_attempts: int = 3
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def __post_init__(self) -> None:
        if not isinstance(self.address, str) or not self.address.strip() or any(c.isspace() for c in self.address):
            raise ValueError("address: must be host:port with no spaces")
        if not isinstance(self.api_key, str) or any(not c.isprintable() or c.isspace() for c in self.api_key):
            raise ValueError("api_key: must be a string of printable characters without spaces")
        if not isinstance(self.tls, bool):
            raise ValueError("tls: must be True or False")
        for name in ("root_certificates", "private_key", "certificate_chain"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bytes):
                raise ValueError(f"{name}: must be PEM bytes")
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("private_key and certificate_chain: give both for mutual TLS, or neither")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not 0 < self.timeout < math.inf:
            raise ValueError("timeout: must be a positive, finite number of seconds")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or not 1 <= self.max_attempts <= 5:
            raise ValueError("max_attempts: must be an integer from 1 to 5 (gRPC caps retries at 5 attempts)")
        if isinstance(self.max_message_bytes, bool) or not isinstance(self.max_message_bytes, int) or not (
            1024 <= self.max_message_bytes <= MAX_MESSAGE_BYTES
        ):
            raise ValueError(f"max_message_bytes: must be an integer from 1024 to {MAX_MESSAGE_BYTES}")

    @property
    def secure(self) -> bool:
        return self.tls or any(x is not None for x in (self.root_certificates, self.private_key, self.certificate_chain))

    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")] if self.api_key else []

    def channel_options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.service_config", self.service_config()),
            ("grpc.enable_retries", 1 if self.max_attempts > 1 else 0),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)

    def service_config(self) -> str:
        config: dict = {"methodConfig": []}
        if self.max_attempts > 1:
            config["methodConfig"].append(
                {
                    "name": [{"service": ROUTER_SERVICE}, {"service": REVIEW_SERVICE}],
                    "retryPolicy": {
                        "maxAttempts": self.max_attempts,
                        "initialBackoff": "0.1s",
                        "maxBackoff": "2s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            )
        return json.dumps(config)
