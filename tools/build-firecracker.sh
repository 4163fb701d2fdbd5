#!/usr/bin/env bash
# Builds Firecracker, the peer tools/bench compares Skiff with, from its source; never downloads
# a binary. Takes git directories already on this machine (bare ones do; nothing is fetched
# here, so CI and offline machines can run it with copies they were given): Firecracker's, and
# that of its one git dependency, micro-http.
#
#   tools/build-firecracker.sh FIRECRACKER_GIT_DIR MICRO_HTTP_GIT_DIR [REF]
#
# REF defaults to v1.16.1, the version in README's figures (the newest commit when the tag is
# absent). micro-http is taken at the commit Firecracker's Cargo.lock names (the newest when that
# commit is absent) and given to Cargo by a [patch] entry; rust-toolchain.toml is removed so the
# installed toolchain builds it (the file pins one rustup would download). Installs libclang-dev
# and libseccomp-dev if absent. The binary lands in ${XDG_CACHE_HOME:-$HOME/.cache}/skiff/
# firecracker/firecracker, where tools/bench looks (besides --peer and PATH); sources and the
# Cargo target folder stay beside it, so a rebuild of the same REF is quick.
# Time on 2 cores: about 5 minutes (a glibc release build with LTO; no jailer).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 FIRECRACKER_GIT_DIR MICRO_HTTP_GIT_DIR [REF]" >&2; exit 2; }
fc_git=$(realpath "$1") http_git=$(realpath "$2") ref=${3:-v1.16.1}
cd "$(dirname "$0")/.."
say() { echo "[build-firecracker] $*" >&2; }
cache=${XDG_CACHE_HOME:-$HOME/.cache}/skiff/firecracker
src=$cache/src

tools/need-packages.sh libclang-dev libseccomp-dev

rev=$(git --git-dir="$fc_git" rev-parse -q --verify "$ref^{commit}" ||
	{ say "$ref not in $fc_git: taking its newest commit" && git --git-dir="$fc_git" rev-parse HEAD; })
# The micro-http commit the lock file pins (source = "git+...micro-http#SHA").
http_rev=$(git --git-dir="$fc_git" show "$rev:Cargo.lock" | sed -n 's/^source = "git+.*micro-http#\([0-9a-f]*\)"/\1/p' | head -1)
http_rev=$(git --git-dir="$http_git" rev-parse -q --verify "${http_rev:-HEAD}^{commit}" ||
	{ say "micro-http ${http_rev:-?} not in $http_git: taking its newest commit" && git --git-dir="$http_git" rev-parse HEAD; })
say "firecracker $ref = $rev, micro-http $http_rev"

# A fresh tree of commit $2 of git dir $1 in folder $3, through an index of its own: the git dir
# is only read. A mirror may lack its largest blobs (Firecracker's lacks a test ELF that the
# build does not use); those are named and left out instead of failing the whole tree.
tree() {
	local index
	index=$(mktemp)
	rm -rf "$3" && mkdir -p "$3"
	GIT_INDEX_FILE=$index git --git-dir="$1" read-tree "$2"
	git --git-dir="$1" ls-tree -r "$2" | while read -r _ type hash path; do
		if [ "$type" = blob ] && ! git --git-dir="$1" cat-file -e "$hash" 2>/dev/null; then
			say "absent from $1, left out: $path"
			GIT_INDEX_FILE=$index git --git-dir="$1" update-index --force-remove -- "$path"
		fi
	done
	GIT_INDEX_FILE=$index git --git-dir="$1" --work-tree="$3" checkout-index -a --prefix="$3/"
	rm -f "$index"
}
tree "$fc_git" "$rev" "$src/firecracker"
tree "$http_git" "$http_rev" "$src/micro-http"
rm -f "$src/firecracker/rust-toolchain.toml"
cat >>"$src/firecracker/Cargo.toml" <<EOF

[patch."https://github.com/firecracker-microvm/micro-http"]
micro_http = { path = "$src/micro-http" }
EOF

say "cargo build --release -p firecracker (about 5 minutes on 2 cores)"
(cd "$src/firecracker" && CARGO_TARGET_DIR=$cache/target cargo build --release -p firecracker)
install -m 755 "$cache/target/release/firecracker" "$cache/firecracker.new"
mv "$cache/firecracker.new" "$cache/firecracker"
"$cache/firecracker" --version >&2
echo "$cache/firecracker"
