#!/usr/bin/env bash
# Build the agent's image from Dockerfile with podman or buildah, from Debian's packages alone: no
# image is pulled from a registry. docs/deploy.md says more; `make image` runs this.
#
#   scripts/build-image.sh [--tag NAME] [--builder podman|buildah] [--no-cache] [--new-base]
#
# --no-cache rebuilds every layer; --new-base makes the base image anew first (a cold build).
# - The Dockerfile starts FROM debian:bookworm-slim. When the builder's store lacks that image, it is
#   made here with mmdebstrap from the machine's own apt sources and imported under that name, once:
#   later builds reuse it (`podman rmi debian:bookworm-slim` makes it again).
# - pip in the build sees the machine's pip configuration (`pip config list`: indexes, CA bundle,
#   constraints) as one pip.conf mounted at /etc/pip.conf, and the local files and folders it names,
#   mounted read-only. Mounts are in no layer. Without a pip configuration, pip's defaults apply.
# - It prints the build time and the image's size.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=netstatd:0.1.0
BUILDER=${BUILDER:-}
BASE=debian:bookworm-slim
NO_CACHE=()
NEW_BASE=
while [ $# -gt 0 ]; do
	case "$1" in
	--tag) TAG=$2; shift 2 ;;
	--builder) BUILDER=$2; shift 2 ;;
	--no-cache) NO_CACHE=(--no-cache); shift ;;
	--new-base) NEW_BASE=1; shift ;;
	-h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "build-image: unknown argument $1 (--help)" >&2; exit 2 ;;
	esac
done
if [ -z "$BUILDER" ]; then
	for b in podman buildah; do command -v "$b" >/dev/null && BUILDER=$b && break; done
fi
case "$BUILDER" in
podman)
	exists() { podman image exists "$1"; }
	import() { podman import --quiet "$1" "$2" >/dev/null; }
	;;
buildah)
	exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
	import() {
		local c
		c=$(buildah from scratch)
		buildah add --quiet "$c" "$1" / >/dev/null && buildah commit --quiet --rm "$c" "$2" >/dev/null
	}
	;;
*) echo "build-image: needs podman or buildah (apt-get install podman), not '${BUILDER}'" >&2; exit 2 ;;
esac

WORK=build/image
mkdir -p "$WORK"
SECONDS=0

if [ -n "$NEW_BASE" ] && exists "$BASE"; then
	# the image built on it first: a base with dependent images cannot be removed
	$BUILDER rmi "$TAG" >/dev/null 2>&1 || true
	$BUILDER rmi "$BASE" >/dev/null
fi
if ! exists "$BASE"; then
	command -v mmdebstrap >/dev/null || { echo "build-image: $BASE is missing and mmdebstrap is not installed (apt-get install mmdebstrap)" >&2; exit 2; }
	echo "build-image: making $BASE with mmdebstrap (from this machine's apt sources)"
	# Like the official slim image: the required packages, no documentation, manual pages or translations.
	mmdebstrap --variant=minbase --quiet \
		--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
		--dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/info/*' \
		--dpkgopt='path-exclude=/usr/share/locale/*' \
		bookworm "$WORK/base.tar"
	import "$WORK/base.tar" "$BASE"
	rm -f "$WORK/base.tar"
	echo "build-image: $BASE made in $SECONDS s"
fi

make -s build/vmlinux.h

# The machine's pip configuration (scripts/image-pip-config.py): one pip.conf, and the local files
# and folders it names, mounted under /run/build-host.
mounts=()
if command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
	python3 scripts/image-pip-config.py "$WORK/pip.conf" /run/build-host >"$WORK/pip-paths"
	if [ -s "$WORK/pip.conf" ]; then
		mounts+=(-v "$PWD/$WORK/pip.conf:/etc/pip.conf:ro")
		while read -r p; do [ -n "$p" ] && mounts+=(-v "$p:/run/build-host$p:ro"); done <"$WORK/pip-paths"
	fi
fi

echo "build-image: $BUILDER build -t $TAG (${#mounts[@]} mount arguments from the machine's pip configuration)"
# runc when present: crun (podman's default in Debian) refuses hosts with hybrid cgroups.
runtime=()
command -v runc >/dev/null && runtime=(--runtime runc)
if [ "$BUILDER" = podman ]; then
	podman "${runtime[@]}" build --pull=never "${NO_CACHE[@]}" "${mounts[@]}" -t "$TAG" -f Dockerfile .
else
	buildah bud "${runtime[@]}" --pull-never "${NO_CACHE[@]}" "${mounts[@]}" -t "$TAG" -f Dockerfile .
fi
size=$($BUILDER image inspect --format '{{.Size}}' "$TAG" 2>/dev/null || $BUILDER inspect --type image --format '{{.Size}}' "$TAG")
echo "build-image: $TAG built in $SECONDS s, $((size / 1048576)) MiB"
