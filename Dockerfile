# Palisade agent image.
#
#   docker build -t palisade:0.1.0 .
#
# Build stage: the release binary from the locked workspace. Needs BuildKit (the default builder of
# current Docker) for the cache mounts, which keep the cargo registry and target/ between builds.
FROM rust:1-bookworm AS builder

WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p palisade \
    && install -D -m 0755 target/release/palisade /out/palisade

# Runtime stage: Debian slim plus the netfilter user-space tools the agent drives
# (iptables-restore/ipset restore) and the ones an operator debugging a node reaches for.
# Debian's iptables package ships both backends (iptables-nft and iptables-legacy); the agent
# picks one with --iptables-backend (auto by default).
FROM debian:bookworm-slim

# Versions are not pinned: bookworm's point releases replace them, and a pin would break
# rebuilds; the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        conntrack \
        iproute2 \
        ipset \
        iptables \
        nftables \
    && rm -rf /var/lib/apt/lists/*

COPY --from=builder /out/palisade /usr/local/bin/palisade

LABEL org.opencontainers.image.title="palisade" \
      org.opencontainers.image.description="NetworkPolicy enforcement and LoadBalancer IPs for bare-metal Kubernetes" \
      org.opencontainers.image.licenses="Apache-2.0"

# No USER: the agent runs as UID 0, on purpose. Programming netfilter and sending raw ARP need
# CAP_NET_ADMIN and CAP_NET_RAW in the *effective* set, which Kubernetes only grants to root
# (there are no ambient capabilities in the pod API, and file capabilities cannot be gained under
# allowPrivilegeEscalation=false). The chart confines that root to exactly those two capabilities
# (drop ALL, add NET_ADMIN and NET_RAW), unprivileged, with a read-only root filesystem.

# The health/metrics server (--listen-addr): /healthz, /readyz, /metrics.
EXPOSE 9476

ENTRYPOINT ["/usr/local/bin/palisade"]
CMD ["agent"]
