#!/usr/bin/env bash
# Regenerates the images in testdata/ (run from anywhere; needs qemu-img,
# qemu-io and python3). The files are committed; this script documents how
# they were made.
set -euo pipefail
cd "$(dirname "$0")"
rm -f disk.qcow2 disk.raw chain-base.raw chain-top.qcow2 broken/*

# disk.qcow2: 8 MiB virtual, 4 KiB clusters, data, a zero range, holes.
qemu-img create -q -f qcow2 -o cluster_size=4096 disk.qcow2 8M
qemu-io -f qcow2 -c "write -P 0x11 0 64k" -c "write -P 0x22 1M 12k" \
  -c "write -z 2M 64k" -c "write -P 0x33 7M 20k" disk.qcow2 >/dev/null

# disk.raw: the same content as a sparse raw file.
qemu-img convert -O raw disk.qcow2 disk.raw

# chain-top.qcow2 over chain-base.raw (relative backing name, raw backing).
qemu-img create -q -f raw chain-base.raw 4M
qemu-io -f raw -c "write -P 0x44 0 256k" -c "write -P 0x45 3M 64k" chain-base.raw >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4096 -b chain-base.raw -F raw chain-top.qcow2 6M
qemu-io -f qcow2 -c "write -P 0x55 64k 16k" -c "write -z 3M 4k" -c "write -P 0x56 5M 8k" chain-top.qcow2 >/dev/null

# broken/: damaged copies of a small qcow2 (4 KiB clusters, 2 MiB virtual).
qemu-img create -q -f qcow2 -o cluster_size=4096 broken/good.qcow2 2M
qemu-io -f qcow2 -c "write -P 0x66 0 128k" -c "write -P 0x67 1M 64k" broken/good.qcow2 >/dev/null
python3 - <<'PY'
import struct
g = open('broken/good.qcow2', 'rb').read()
def w(name, data):
    open('broken/' + name, 'wb').write(data)
def patch(name, off, fmt, val):
    b = bytearray(g); struct.pack_into(fmt, b, off, val); w(name, bytes(b))
w('empty.img', b'')
w('truncated-header.qcow2', g[:50])
w('truncated-data.qcow2', g[:len(g) - 32768])
patch('bad-magic.qcow2', 0, '>I', 0x12345678)
patch('huge-l1.qcow2', 36, '>I', 0xffffffff)
patch('cluster-bits.qcow2', 20, '>I', 40)
patch('incompat-bit.qcow2', 72, '>Q', 1 << 20)
patch('refcount-table.qcow2', 56, '>I', 0xffffffff)
patch('version.qcow2', 4, '>I', 9)
l1 = struct.unpack_from('>Q', g, 40)[0]
l2 = struct.unpack_from('>Q', g, l1)[0] & 0x00fffffffffffe00
patch('l1-past-eof.qcow2', l1, '>Q', (1 << 63) | ((len(g) + (1 << 20)) & ~0xffff))
patch('l2-past-eof.qcow2', l2, '>Q', (1 << 63) | ((len(g) + (1 << 24)) & ~0xffff))
patch('l2-unaligned.qcow2', l2, '>Q', (struct.unpack_from('>Q', g, l2)[0] + 512))
PY
rm broken/good.qcow2
ls -la . broken
