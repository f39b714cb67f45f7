# portcullis container image.
#   docker build -t portcullis .
#   docker run --rm -p 8080:8080 portcullis
# The image's config is config/docker.toml (SQLite in /var/lib/portcullis, admin
# on loopback, no admin token). Mount your own over /etc/portcullis/portcullis.toml
# or set PORTCULLIS_CONFIG; docker-compose.yml shows a Redis setup.

# ---- build ------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: only Cargo.toml/Cargo.lock changes
# rebuild them. A dummy lib + main stands in for the real sources.
# .cargo/ and pgo/: release builds use the PGO profile (pgo/README.md).
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY pgo ./pgo
RUN mkdir -p src \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src \
           target/release/portcullis* \
           target/release/deps/portcullis-* \
           target/release/deps/libportcullis-* \
           target/release/.fingerprint/portcullis-*

# The real sources. `touch` so cargo never takes the dummy build as up to date.
# The release profile keeps line tables (debug = "line-tables-only"); the image
# drops them (67 MB -> 15 MB) but keeps symbols, so backtraces still name functions.
COPY src ./src
COPY config ./config
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked \
 && objcopy --strip-debug target/release/portcullis /usr/local/bin/portcullis

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim

# ca-certificates for https:// upstreams and rediss://; curl for the HEALTHCHECK.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 portcullis \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/portcullis \
            --no-create-home --shell /usr/sbin/nologin portcullis \
 && mkdir -p /var/lib/portcullis /etc/portcullis \
 && chown 10001:10001 /var/lib/portcullis \
 && chmod 0750 /var/lib/portcullis

COPY --from=build /usr/local/bin/portcullis /usr/local/bin/portcullis
COPY config/docker.toml /etc/portcullis/portcullis.toml

ENV PORTCULLIS_CONFIG=/etc/portcullis/portcullis.toml
WORKDIR /var/lib/portcullis
VOLUME ["/var/lib/portcullis"]

# 8080: public listener. 9901: admin listener (loopback in docker.toml; see
# config/compose.toml to reach it from outside the container).
EXPOSE 8080 9901

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9901/healthz || exit 1

# Numeric so that orchestrators (Kubernetes runAsNonRoot) can verify it is not root.
USER 10001:10001
ENTRYPOINT ["portcullis"]
CMD ["serve"]
