# syntax=docker/dockerfile:1
# quotad and quotactl in a distroless image, running as uid 65532.
#   docker build -t quotad:0.1.0 .
# protoc comes vendored with the build (protoc-bin-vendored): nothing to install.

FROM rust:1-bookworm AS build
WORKDIR /src

# Dependencies first, against empty sources, so that this layer is reused until Cargo.toml or
# Cargo.lock changes.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
RUN mkdir -p src/bin benches \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/quotactl.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/decisions.rs \
    && echo 'fn main() {}' > benches/outage.rs \
    && cargo build --locked --release --bin quotad --bin quotactl \
    && rm -rf src benches

# The real sources; touch them so that cargo rebuilds over the placeholders.
COPY src ./src
COPY benches ./benches
RUN touch src/main.rs src/lib.rs src/bin/quotactl.rs \
    && cargo build --locked --release --bin quotad --bin quotactl \
    && cp target/release/quotad target/release/quotactl /usr/local/bin/

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="quotad" \
      org.opencontainers.image.description="Quota-enforcement sidecar: plan windows, reservations and prepaid credits over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /usr/local/bin/quotad /usr/local/bin/quotactl /usr/local/bin/
ENV QUOTAD_LOG_FORMAT=json \
    QUOTAD_LISTEN=0.0.0.0:50051 \
    QUOTAD_HTTP_LISTEN=0.0.0.0:9090
USER 65532:65532
# gRPC (QuotaService, AdminService, health) and HTTP (/metrics, /healthz, /readyz).
EXPOSE 50051 9090
ENTRYPOINT ["quotad"]
CMD ["serve"]
