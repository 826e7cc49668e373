# syntax=docker/dockerfile:1
# quotad and quotactl in a distroless image, running as uid 65532.
#   docker build -t quotad:0.1.0 .
# protoc comes vendored with the build (protoc-bin-vendored): nothing to install.
#
# The dependencies are compiled in a layer of their own, reused until Cargo.toml or Cargo.lock
# changes, with cargo-chef: `cargo chef prepare` reads the manifest and every target it declares
# or that cargo discovers (binaries, benches, tests, examples, the build script) into
# recipe.json, and `cargo chef cook` compiles the dependencies against stubs of those targets.
# A new bench, test or binary therefore needs no edit here. tests/integration/dockerfile.rs checks
# this file against Cargo.toml, .dockerignore and the Helm chart.

# The toolchain of every build stage (cook and build must use the same one, or the cooked layer
# is not reused). Bookworm, like the runtime image below (glibc).
FROM rust:1-bookworm AS chef
RUN cargo install --locked cargo-chef@0.1.78
WORKDIR /src

# The recipe: manifests and target list only. This stage reruns on every source change, but its
# output, recipe.json, changes only with the dependencies and the targets.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
# The same profile, flags and binaries as the build below, so that cargo reuses what this built.
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin quotad --bin quotactl
# The real sources (the build context minus .dockerignore) replace the stubs; cook has deleted
# what it compiled of this package, so cargo compiles quotad itself again.
COPY . .
RUN cargo build --release --locked --bin quotad --bin quotactl

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="quotad" \
      org.opencontainers.image.description="Quota-enforcement sidecar: plan windows, reservations and prepaid credits over gRPC" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /src/target/release/quotad /src/target/release/quotactl /usr/local/bin/
ENV QUOTAD_LOG_FORMAT=json \
    QUOTAD_LISTEN=0.0.0.0:50051 \
    QUOTAD_HTTP_LISTEN=0.0.0.0:9090
# Numeric, so that Kubernetes can check runAsNonRoot against the image.
USER 65532:65532
# gRPC (QuotaService, AdminService, health) and HTTP (/metrics, /healthz, /readyz).
EXPOSE 50051 9090
ENTRYPOINT ["quotad"]
CMD ["serve"]
