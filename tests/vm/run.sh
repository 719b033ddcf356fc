#!/usr/bin/env bash
# The real-VM tests (tests/it/vm.rs): QEMU boots the host's kernel with a
# busybox initramfs that writes numbered records to its virtio disk, served
# by `imgbackup serve`, or run by libvirt and backed up in pull mode over
# NBD (docs/live-vms.md); backups taken while it writes must be
# point-in-time. Installs what it needs (Debian), then runs the tests,
# which `cargo test` skips (ignored) because they boot VMs.
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
command -v libvirtd >/dev/null && command -v virsh >/dev/null \
  || need+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
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
  # QEMU and libvirt follow qemu-utils' release; the kernel and busybox
  # come from the default one.
  others=() qemu=()
  for p in "${need[@]}"; do
    case "$p" in qemu-system-x86|libvirt-*) qemu+=("$p") ;; *) others+=("$p") ;; esac
  done
  install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-remove --no-install-recommends "$@"; }
  if ! { apt-get update \
         && { [ ${#others[@]} -eq 0 ] || install "${others[@]}"; } \
         && { [ ${#qemu[@]} -eq 0 ] || install "${release[@]}" "${qemu[@]}"; }; }; then
    if $if_possible; then
      echo "tests/vm/run.sh: cannot install ${need[*]}: the real-VM test did not run" >&2
      exit 0
    fi
    exit 1
  fi
fi
command -v qemu-img >/dev/null || { echo "qemu-img is missing (apt-get install qemu-utils)" >&2; exit 1; }
# libvirt's daemons, when no service manager started them.
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 100); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.1; done
fi
if virsh -c qemu:///system version >/dev/null 2>&1; then
  cargo test --test it -- --ignored --nocapture --test-threads=1 vm::
elif $if_possible; then
  echo "tests/vm/run.sh: libvirtd is not reachable: the libvirt test did not run" >&2
  cargo test --test it -- --ignored --nocapture vm::vm_writing_through_the_server
else
  echo "tests/vm/run.sh: libvirtd is not reachable (qemu:///system)" >&2
  exit 1
fi
