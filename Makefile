# apiserver-proxy build, test and demo entry points.
# Every target installs what it needs when it is missing, so a fresh Debian
# machine (or CI, as root) needs nothing but this checkout and rustup.

SHELL := /bin/bash
MUSL_TARGET := x86_64-unknown-linux-musl
RELEASE_DIR := target/$(MUSL_TARGET)/release
BINARIES := apiserver-proxy-sidecar apiserver-proxy-pod-webhook proxy-server proxy-agent proxy-test-client http-test-server
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all build test lint unit integration demo deps deps-build deps-test clean venv certs image bench

all: build

# --- installing what is missing -------------------------------------------
# apt-get update runs once, before the first install of this make run.
# Each spec is CHECK:PACKAGE; CHECK is a command name, or an absolute path
# that must exist (for packages without a command, such as Go sources).
APT_STAMP := target/.apt-updated
define apt_install
	@missing=""; for spec in $(1); do cmd=$${spec%%:*}; pkg=$${spec##*:}; \
	  case $$cmd in /*) [ -e $$cmd ];; *) command -v $$cmd >/dev/null 2>&1;; esac \
	    || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; mkdir -p target; \
	  [ -f $(APT_STAMP) ] || { $(SUDO) apt-get update -qq && touch $(APT_STAMP); }; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

deps-build:
	$(call apt_install,musl-gcc:musl-tools file:file)
	@rustup target list --installed | grep -qx $(MUSL_TARGET) || rustup target add $(MUSL_TARGET)

# grpc-go and protobuf-go sources for the Go peers of tests/grpc_go_interop.rs
# (built offline in GOPATH mode).
GOCODE := /usr/share/gocode/src

deps-test: deps-build
	$(call apt_install,ip:iproute2 iptables:iptables ip6tables:iptables curl:curl openssl:openssl jq:jq unshare:util-linux chroot:coreutils sysctl:procps)
	$(call apt_install,go:golang-go $(GOCODE)/google.golang.org/grpc:golang-google-grpc-dev $(GOCODE)/google.golang.org/protobuf/encoding/protowire:golang-google-protobuf-dev)

deps: deps-test

# --- building -------------------------------------------------------------
build: deps-build
	cargo build --release --locked --target $(MUSL_TARGET) --bins
	@for b in $(BINARIES); do \
	  printf '%-32s %8s bytes  ' $$b $$(stat -c %s $(RELEASE_DIR)/$$b); \
	  file -b $(RELEASE_DIR)/$$b | cut -d, -f1-2,4; done

# --- images -----------------------------------------------------------------
# `make image BIN=proxy-server [IMAGE=name:tag]`: one binary in a FROM scratch
# image. Needs a Docker engine; without one it says so and fails (exit 1), so a
# CI job that expects an image notices. Not part of `make test`.
BIN ?= apiserver-proxy-sidecar
IMAGE ?= $(BIN):latest
image:
	@case " $(BINARIES) " in *" $(BIN) "*) ;; \
	  *) echo "BIN=$(BIN) is not one of: $(BINARIES)" >&2; exit 2 ;; esac
	@command -v docker >/dev/null 2>&1 || { echo "no Docker engine here: the docker CLI is not installed; install Docker to run make image" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "no Docker engine here: 'docker info' fails (is the daemon running, and may this user reach its socket?)" >&2; exit 1; }
	docker build -f Dockerfile.scratch --build-arg BIN=$(BIN) -t $(IMAGE) .

# --- testing ----------------------------------------------------------------
lint:
	cargo fmt --all --check
	cargo clippy --locked --all-targets -- -D warnings

unit:
	cargo test --locked --lib --bins

# Integration tests run the real binaries in network namespaces (root) and
# the static release binaries in empty roots.
integration: deps-test build venv
	APISERVER_PROXY_RELEASE_DIR=$(CURDIR)/$(RELEASE_DIR) APISERVER_PROXY_PYTHON=$(VENV)/bin/python cargo test --locked --tests

test: deps-test lint integration

# --- demo -------------------------------------------------------------------
demo: deps-test build
	RELEASE_DIR=$(CURDIR)/$(RELEASE_DIR) ./scripts/demo.sh

clean:
	cargo clean

# --- benchmarks (not part of `make test`) ------------------------------------
# One table of ratios against baselines measured in the same run (direct TCP,
# socat, squid, nginx): printed and written to bench/RESULTS.md. Root (network
# namespaces, sysctls for 10,000 idle tunnels, all restored). About 5 minutes;
# BENCH_QUICK=1 for a short development run that writes nothing.
# The load tool is built at opt-level 3 in its own target dir: it stands for
# the clients and must not be the bottleneck (our binaries stay size-tuned).
BENCH_TOOL_DIR := target/bench-tool
bench: build
	$(call apt_install,socat:socat /usr/sbin/squid:squid /usr/sbin/nginx:nginx-light wrk:wrk curl:curl openssl:openssl ip:iproute2 python3:python3 tar:tar)
	CARGO_PROFILE_RELEASE_OPT_LEVEL=3 CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
	  CARGO_PROFILE_RELEASE_PANIC=unwind \
	  cargo build --release --locked --example bench_load --target-dir $(BENCH_TOOL_DIR)
	RELEASE_DIR=$(CURDIR)/$(RELEASE_DIR) BENCH_LOAD=$(CURDIR)/$(BENCH_TOOL_DIR)/release/examples/bench_load \
	  python3 bench/bench.py

# --- Python peers (grpcio, jsonpatch) for the interop tests -----------------
VENV := $(CURDIR)/.venv
venv: $(VENV)/.ready
$(VENV)/.ready: tests/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
	touch $@

# --- certificates (upstream layout) for the tunnel demo and tests -------------
certs:
	$(call apt_install,openssl:openssl)
	./scripts/make-certs.sh certs

# --- fuzzing (not part of `make test`) ----------------------------------------
# A bounded run of each target (FUZZ_TIME seconds each; FUZZ_TARGETS to pick)
# from the committed corpus (fuzz/corpus/<target>, plus fuzz/seeds/<target>);
# new inputs go to fuzz/work/<target> (ignored), a crash leaves its input in
# fuzz/artifacts/<target>/ and fails the run (turn it into a unit test beside
# the code). As root the targets run without a network (unshare -n): the
# flag parsers resolve host names. `make fuzz-cmin` folds fuzz/work into the
# committed corpus, minimized.
.PHONY: fuzz fuzz-build fuzz-cmin soak
FUZZ_TIME ?= 30
FUZZ_TARGETS ?= frame_decoder packet_decoder connection hpack connect_parser review flags tls_records
FUZZ_BIN := fuzz/target/x86_64-unknown-linux-gnu/release
FUZZ_NET := $(shell [ "$$(id -u)" = 0 ] && unshare -n true 2>/dev/null && echo unshare -n)
fuzz-build:
	@command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
	cargo +nightly fuzz build
fuzz: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/work/$$t fuzz/corpus/$$t fuzz/artifacts/$$t; \
	  seeds=; [ -d fuzz/seeds/$$t ] && seeds=fuzz/seeds/$$t; \
	  echo "== fuzz $$t ($(FUZZ_TIME) s; log fuzz/work/$$t.log)"; \
	  $(FUZZ_NET) $(FUZZ_BIN)/$$t -max_total_time=$(FUZZ_TIME) -rss_limit_mb=1024 -timeout=30 \
	    -print_final_stats=1 -artifact_prefix=fuzz/artifacts/$$t/ \
	    fuzz/work/$$t fuzz/corpus/$$t $$seeds >fuzz/work/$$t.log 2>&1 \
	    || { tail -40 fuzz/work/$$t.log; echo "fuzz $$t: FAILED, input in fuzz/artifacts/$$t/"; exit 1; }; \
	  grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::(number_of_executed_units|peak_rss_mb)' fuzz/work/$$t.log; \
	done
fuzz-cmin: fuzz-build
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/work/$$t fuzz/corpus/$$t; rm -rf fuzz/work/.cmin; mkdir -p fuzz/work/.cmin; \
	  cp fuzz/corpus/$$t/seed-* fuzz/work/.cmin/ 2>/dev/null; \
	  $(FUZZ_NET) $(FUZZ_BIN)/$$t -merge=1 -use_counters=0 -rss_limit_mb=1024 fuzz/work/.cmin fuzz/corpus/$$t fuzz/work/$$t \
	    >fuzz/work/$$t.cmin.log 2>&1 || { tail -20 fuzz/work/$$t.cmin.log; exit 1; }; \
	  rm -rf fuzz/corpus/$$t; mv fuzz/work/.cmin fuzz/corpus/$$t; \
	  echo "$$t: $$(ls fuzz/corpus/$$t | wc -l) files, $$(du -sk fuzz/corpus/$$t | cut -f1) KiB"; \
	done

# --- soak (not part of `make test`) -----------------------------------------
# SOAK_SECONDS (default 600) of mixed load on the release binaries, sampling
# every process; see soak/soak.py for what runs and the pass rule.
soak: build
	$(call apt_install,openssl:openssl)
	python3 soak/soak.py $(RELEASE_DIR)
