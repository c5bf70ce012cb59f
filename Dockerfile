# syntax=docker/dockerfile:1
#
# credit-ledger: build the binary with the Rust toolchain, run it on a slim Debian image as a
# non-root user. The container listens on 0.0.0.0:8080, where demo mode is refused: give it
# AUTH_JWT_SECRET, STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRET, GRSAI_API_KEY and
# PUBLIC_BASE_URL (see docker-compose.yml and docs/CONFIGURATION.md).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# Migrations, web assets and openapi.json are embedded in the binary at compile time.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p credit-ledger \
    && cp target/release/credit-ledger /usr/local/bin/credit-ledger

FROM debian:bookworm-slim AS runtime
# curl: for the health check. ca-certificates: for outgoing HTTPS (Stripe, Grsai).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin credit-ledger \
    && mkdir -p /app && chown credit-ledger /app
COPY --from=builder /usr/local/bin/credit-ledger /usr/local/bin/credit-ledger
USER credit-ledger
WORKDIR /app
ENV LISTEN_ADDR=0.0.0.0:8080 \
    RUST_LOG=info,sqlx=warn,tokio_postgres=warn
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["credit-ledger"]
CMD ["serve"]
