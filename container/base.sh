#!/usr/bin/env bash
# The local base image for `make image` on a machine no registry serves images to: Debian's
# minimal root file system with python3, made by debootstrap from the distribution's own
# packages and imported into podman. Made once and reused while the image exists; a lock
# keeps two builds (two checkouts' test runs) from making it at once.
#   container/base.sh IMAGE [SUITE]     e.g. localhost/wsechod-base:bookworm bookworm
set -euo pipefail
image=${1:?usage: base.sh IMAGE [SUITE]}
suite=${2:-bookworm}
podman=${PODMAN:-podman}

exec 9>/var/tmp/wsechod-base.lock
flock 9
if $podman image exists "$image"; then
  exit 0
fi
root=$(mktemp -d /var/tmp/wsechod-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "making $image with debootstrap ($suite, minbase and python3; about a minute)" >&2
if ! debootstrap --variant=minbase --include=python3 "$suite" "$root" >"$root.log" 2>&1; then
  tail -20 "$root.log" >&2
  exit 1
fi
rm -f "$root.log"
# What no image needs: package caches and lists, documentation, translations; and none of
# it comes back with packages installed later.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/usr/share/locale/*
cat >"$root/etc/dpkg/dpkg.cfg.d/excludes" <<'CFG'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
CFG
tar -C "$root" -c . | $podman import --quiet --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
echo "made $image" >&2
