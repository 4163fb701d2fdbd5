#!/bin/sh
# Installs the Debian packages named as arguments that are not installed yet (as root; otherwise
# says which are missing and fails).  Usage: tools/need-packages.sh PACKAGE...
set -eu
missing=""
for p in "$@"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
	echo "missing Debian packages:$missing (apt-get install them as root)" >&2
	exit 1
fi
echo "installing$missing" >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >&2
