#!/usr/bin/env bash
# Runs every Skiff check on a fresh machine: installs what the tests need (Debian packages as
# root), builds the Linux guest and the sandbox image (cached under ~/.cache/skiff), then
# format, lints, all tests, a time-bounded fuzz run of the API and one of the fuzz/ targets.
#
#   tools/test.sh            everything
#   tools/test.sh --quick    skip the Linux guest tests (no kernel build)
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "[test] $*" >&2; }
quick=0
[ "${1:-}" = --quick ] && quick=1

# The test guest (gcc, ld), network tests (ip, dnsmasq), disk checks on the host (debugfs).
tools/need-packages.sh gcc binutils iproute2 dnsmasq-base e2fsprogs

if [ "$quick" = 0 ]; then
	say "building the Linux guest (first run: about 5-10 minutes; cached afterwards)"
	SKIFF_LINUX_DIR=$(resources/linux/build.sh auto | tail -n 1)
	export SKIFF_LINUX_DIR
	say "Linux guest: $SKIFF_LINUX_DIR"
	say "building the sandbox root image (first run: about 30 s; cached afterwards)"
	SKIFF_SANDBOX_DIR=$(resources/sandbox/build.sh | tail -n 1)
	export SKIFF_SANDBOX_DIR
	say "sandbox image: $SKIFF_SANDBOX_DIR"
else
	export SKIFF_SKIP_LINUX=1
fi

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "cargo test"
cargo test --workspace --locked --all-targets
cargo test --workspace --locked --doc
say "API fuzzing (schemathesis, 60 s)"
tools/fuzz-api.sh 60
say "coverage-guided fuzzing (cargo-fuzz, 90 s; first build about 3-6 minutes)"
tools/fuzz.sh 90
