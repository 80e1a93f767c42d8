# One obvious command per task. `make test` and `make demo` work on a fresh Debian machine
# as root: they install what is missing (apt: iptables, ipset, iproute2, conntrack, shellcheck;
# pip: the Helm SDK and pytest) before doing anything else.
CARGO ?= cargo
PYTHON ?= python3
APT_PACKAGES := iptables ipset iproute2 conntrack kmod shellcheck bird2 nftables
export CARGO_TERM_COLOR ?= never

.PHONY: all build deps test test-rust test-chart lint fmt crds demo bench fuzz clean-lab

all: build

build:
	$(CARGO) build --workspace --bins

## deps: OS and Python packages the tests and the demo need (idempotent, quiet when present)
deps:
	@missing=""; \
	for b in iptables iptables-restore ipset ip conntrack shellcheck bird nft; do \
	  command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo ">> installing OS packages (missing:$$missing)"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install $(APT_PACKAGES)"; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi
	@$(PYTHON) -c "import helm_python, yaml, pytest, kubernetes" 2>/dev/null || { \
	  echo ">> installing Python test packages"; \
	  $(PYTHON) -m pip install -q --disable-pip-version-check -r tests/chart/requirements.txt; }

## test: every test (unit, integration against the test API server, network namespaces, chart)
test: deps test-rust test-chart

test-rust:
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

## test-chart: the Helm chart (rendered and linted by Helm v4) and dry runs of e2e/kind/run.sh
test-chart:
	$(PYTHON) -m pytest tests/chart tests/kind -q

## lint: formatting, clippy and rustdoc with warnings denied, as CI wants them
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings -A rustdoc::private_intra_doc_links" \
	  $(CARGO) doc --workspace --no-deps --document-private-items

fmt:
	$(CARGO) fmt --all

## crds: regenerate crds/ and the chart's copy from the Rust types
crds:
	$(CARGO) run -q -p palisade -- crdgen --out-dir crds
	cp crds/*.yaml charts/palisade/crds/

## demo: the lab demo (needs root: it builds network namespaces)
demo: deps
	$(CARGO) build --release -p palisade -p palisade-e2e
	./target/release/palisade-lab demo

## fuzz: every fuzz target for FUZZ_SECONDS each (libFuzzer via cargo-fuzz; fuzz/ is its own
## workspace; RUSTC_BOOTSTRAP=1 lets the stable toolchain take libFuzzer's -Z flags)
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= manifests manifests_fastyaml pool_address membership_datagram arp_ndp bgp_message policy_render
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t seeds/$$t && \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -s none -O $$t corpus/$$t seeds/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -print_final_stats=1 || exit 1; \
	done

bench:
	$(CARGO) run --release -p palisade-dataplane --example netpol_bench
	$(CARGO) run --release -p palisade-loadbalancer --example alloc_bench

## clean-lab: remove lab network namespaces left by a killed run
clean-lab:
	-./target/release/palisade-lab clean || ./target/debug/palisade-lab clean
