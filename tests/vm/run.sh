#!/usr/bin/env bash
# The real-VM test of `imgbackup serve` (tests/it/vm.rs): QEMU boots the
# host's kernel with a busybox initramfs that writes numbered records to
# its virtio disk, served by imgbackup; backups taken while it writes must
# be point-in-time. Installs what it needs (Debian), then runs the test,
# which `cargo test` skips (ignored) because it boots a VM.
#
# qemu-system-x86 must come from the same release as the installed
# qemu-utils: installing bookworm's 7.2 next to a backported qemu-utils
# 10.0 makes apt remove qemu-utils (qemu-img, qemu-io, qemu-nbd); apt runs
# with --no-remove, so it fails instead.
#
# --if-possible (CI): when the packages cannot be installed, say so and
# exit 0; once they are there, the test's result is the script's.
set -euo pipefail
cd "$(dirname "$0")/../.."
if_possible=false
[ "${1:-}" = "--if-possible" ] && if_possible=true

need=()
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v modinfo >/dev/null || need+=(kmod)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
if [ ${#need[@]} -gt 0 ]; then
  release=()
  utils=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  if [[ "$utils" == *bpo* ]]; then
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    if ! grep -rqs "${codename}-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$codename" > /etc/apt/sources.list.d/imgbackup-backports.sources
    fi
    release=(-t "${codename}-backports")
  fi
  # Only QEMU follows qemu-utils' release; the kernel and busybox come from
  # the default one.
  others=()
  for p in "${need[@]}"; do [ "$p" = qemu-system-x86 ] || others+=("$p"); done
  install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-remove --no-install-recommends "$@"; }
  if ! { apt-get update \
         && { [ ${#others[@]} -eq 0 ] || install "${others[@]}"; } \
         && { command -v qemu-system-x86_64 >/dev/null || install "${release[@]}" qemu-system-x86; }; }; then
    if $if_possible; then
      echo "tests/vm/run.sh: cannot install ${need[*]}: the real-VM test did not run" >&2
      exit 0
    fi
    exit 1
  fi
fi
command -v qemu-img >/dev/null || { echo "qemu-img is missing (apt-get install qemu-utils)" >&2; exit 1; }
cargo test --test it -- --ignored --nocapture vm::
