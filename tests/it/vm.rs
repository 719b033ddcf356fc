//! A real VM behind `imgbackup serve`: QEMU (TCG) boots the host's Debian
//! kernel with a busybox initramfs whose init writes numbered records to
//! its virtio disk, one after the other (O_DIRECT), record i into slot
//! i mod 64 (slot s at s MiB). A backup taken while it writes is
//! point-in-time exactly when there is one T such that every slot holds
//! the last record i <= T written to it.
//!
//! Needs qemu-system-x86_64, a kernel in /boot with its virtio modules, and
//! busybox (Debian: qemu-system-x86, linux-image-amd64, busybox-static):
//! `tests/vm/run.sh` installs them and runs this test, which is ignored by
//! `cargo test` otherwise.

use crate::fixture::*;
use crate::serve::Served;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SLOTS: u64 = 64;
const MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];

const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
# Dependencies first; a module whose dependency is not loaded yet fails
# and is tried again on the next pass (kernels differ in what needs what).
for pass in 1 2 3; do
  for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
    [ -f /lib/modules/$m.ko ] && $B insmod /lib/modules/$m.ko 2>/dev/null
  done
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do $B sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || { echo "GUEST: NO DISK"; $B poweroff -f; }
echo "GUEST: START"
i=1
while true; do
  s=$((i % 64))
  $B printf 'SEQ %08d\n' $i | $B dd of=/dev/vda bs=4096 seek=$((s * 256)) conv=notrunc oflag=direct 2>/dev/null || { echo "GUEST: WRITE FAILED $i"; break; }
  [ $((i % 100)) = 0 ] && echo "GUEST: $i"
  i=$((i+1))
done
$B poweroff -f
"#;

/// The kernel and an initramfs (busybox, the virtio modules, INIT).
fn boot_files(p: &Path) -> (PathBuf, PathBuf) {
    let kernel = std::fs::read_dir("/boot")
        .expect("/boot")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .expect("a kernel in /boot (apt-get install linux-image-amd64)");
    let version = kernel.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    let root = p.join("initramfs");
    for d in ["bin", "lib/modules", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox (apt-get install busybox-static)");
    for m in MODULES {
        let o = Command::new("modinfo")
            .args(["-k", &version, "-n", m])
            .output()
            .expect("modinfo");
        let path = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let to = root.join(format!("lib/modules/{m}.ko"));
        if path.contains("builtin") {
            continue; // built into the kernel: the init skips it
        }
        assert!(o.status.success(), "module {m}: {path}");
        // Compressed modules are unpacked: busybox insmod loads plain ones.
        let unpack = match path.rsplit('.').next() {
            Some("xz") => Some("xz"),
            Some("zst") => Some("zstd"),
            Some("gz") => Some("gzip"),
            _ => None,
        };
        match unpack {
            None => {
                std::fs::copy(&path, &to).unwrap();
            }
            Some(tool) => {
                let o = Command::new(tool)
                    .args(["-dc", &path])
                    .output()
                    .expect(tool);
                assert!(o.status.success(), "{tool} -dc {path}");
                std::fs::write(&to, o.stdout).unwrap();
            }
        }
    }
    let init = root.join("init");
    std::fs::write(&init, INIT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let initrd = p.join("initrd.cpio");
    let o = Command::new("sh")
        .current_dir(&root)
        .args([
            "-c",
            "find . | /bin/busybox cpio -o -H newc > ../initrd.cpio",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (kernel, initrd)
}

/// The records in the slots of `img` (None: never written).
fn slots(p: &Path, img: &str) -> Vec<Option<u64>> {
    let data = raw_content(p, img);
    (0..SLOTS)
        .map(|s| {
            let rec = &data[(s << 20) as usize..(s << 20) as usize + 13];
            let text = std::str::from_utf8(rec).ok()?;
            text.strip_prefix("SEQ ")?.trim_end().parse().ok()
        })
        .collect()
}

/// The point in time `img` holds: the T with every slot the last record
/// <= T written to it. Panics if there is none.
fn consistent_cut(p: &Path, img: &str) -> u64 {
    let v = slots(p, img);
    let t = v.iter().flatten().copied().max().expect("no record at all");
    for (s, got) in v.iter().enumerate() {
        let last = t - (t + SLOTS - s as u64) % SLOTS;
        let want = (last >= 1).then_some(last);
        assert_eq!(
            *got, want,
            "{img}: slot {s} holds {got:?}, the cut at {t} needs {want:?}: not point-in-time"
        );
    }
    t
}

/// Wait until the VM's init says it writes (3 minutes at most: TCG).
fn wait_for_guest(log: &Path) {
    let t0 = Instant::now();
    loop {
        let console = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            !console.contains("GUEST: NO DISK"),
            "the VM found no virtio disk (its modules did not load):\n{console}"
        );
        if console.contains("GUEST: START") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "the VM did not start writing"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn guest_count(log: &Path) -> u64 {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("GUEST: ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
#[ignore = "boots a VM: needs qemu-system-x86_64, a kernel and busybox (tests/vm/run.sh)"]
fn vm_writing_through_the_server_gets_point_in_time_backups() {
    let d = tempdir();
    let p = d.path();
    let (kernel, initrd) = boot_files(p);
    qemu_img(p, &["create", "-q", "-f", "raw", "disk.raw", "64M"]);
    qemu_io(p, "raw", "disk.raw", &["write -P 0x5a 0 64M"]);
    let s = Served::start(p, "disk.raw", &[]);
    let log = p.join("vm.log");
    let mut vm = Command::new("qemu-system-x86_64")
        .current_dir(p)
        .args(["-nographic", "-no-reboot", "-m", "256", "-smp", "1", "-kernel"])
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1", "-drive"])
        .arg(format!(
            "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},if=virtio,cache=none",
            s.socket.display()
        ))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    wait_for_guest(&log);
    std::thread::sleep(Duration::from_secs(2));
    // A full backup (anchoring b0) and an incremental, each slowed down so
    // the VM rewrites every slot several times while it runs.
    let before = guest_count(&log);
    let full = ok(
        p,
        &[
            "backup",
            "disk.raw",
            "full.qcow2",
            "--bitmap",
            "b0",
            "--speed",
            "8M",
        ],
    );
    let during = guest_count(&log) - before;
    std::thread::sleep(Duration::from_secs(2));
    let inc = ok(
        p,
        &[
            "backup",
            "--sync",
            "incremental",
            "--bitmap",
            "b0",
            "disk.raw",
            "inc.qcow2",
            "--speed",
            "512K",
        ],
    );
    let t_full = consistent_cut(p, "full.qcow2");
    let t_inc = consistent_cut(p, "inc.qcow2");
    eprintln!(
        "VM: {during} writes during the full backup, cut at record {t_full}; incremental cut at {t_inc}; clients {} / {} writes during the jobs",
        full["clients"]["writes"], inc["clients"]["writes"]
    );
    assert!(
        during > 2 * SLOTS,
        "only {during} VM writes during the full backup"
    );
    assert!(t_inc > t_full);
    assert!(
        full["copy_before_write_copies"].as_u64().unwrap() > 0,
        "{full}"
    );
    let _ = vm.kill();
    let _ = vm.wait();
    let (rc, err) = s.stop();
    assert_eq!(rc, 0, "{err}");
    // After the VM and the server: the bitmap is exact.
    Backup::new(p, "disk.raw", "last.qcow2")
        .sync("incremental")
        .bitmap("b0")
        .ok();
    qemu_img(p, &["convert", "-O", "raw", "last.qcow2", "flat.raw"]);
    assert!(identical(p, "flat.raw", "disk.raw"));
}

/// `virsh` on the system libvirt; the output, which must be a success.
fn virsh(args: &[&str]) -> String {
    let o = Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("virsh (apt-get install libvirt-clients)");
    assert!(
        o.status.success(),
        "virsh {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A transient libvirt domain, destroyed when dropped.
struct Domain(String);

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = Command::new("virsh")
            .args(["-c", "qemu:///system", "destroy", &self.0])
            .output();
    }
}

#[test]
#[ignore = "boots a VM under libvirt: needs libvirtd, qemu-system-x86_64, a kernel and busybox (tests/vm/run.sh)"]
fn libvirt_pull_mode_backups_of_a_running_vm_are_point_in_time() {
    let d = tempdir();
    let p = d.path();
    let (kernel, initrd) = boot_files(p);
    qemu_img(p, &["create", "-q", "-f", "qcow2", "vm.qcow2", "64M"]);
    qemu_io(p, "qcow2", "vm.qcow2", &["write -P 0x5a 0 64M"]);
    let name = format!(
        "imgbackup-{}",
        p.file_name()
            .unwrap()
            .to_string_lossy()
            .replace(|c: char| !c.is_ascii_alphanumeric(), "")
    );
    let log = p.join("console.log");
    let xml = format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1</cmdline></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{log}'/><target port='0'/></serial>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>"#,
        kernel = kernel.display(),
        initrd = initrd.display(),
        disk = p.join("vm.qcow2").display(),
        log = log.display(),
    );
    std::fs::write(p.join("domain.xml"), xml).unwrap();
    virsh(&["create", &p.join("domain.xml").display().to_string()]);
    let _dom = Domain(name.clone());
    wait_for_guest(&log);
    std::thread::sleep(Duration::from_secs(2));
    let sock = p.join("backup.sock");
    let uri = format!("nbd+unix:///vda?socket={}", sock.display());
    // docs/live-vms.md, libvirt: backup XML (pull mode), checkpoint XML.
    let backup_xml = |incremental: Option<&str>| {
        format!(
            r#"<domainbackup mode='pull'>{}
  <server transport='unix' socket='{}'/>
  <disks>
    <disk name='vda' backup='yes' type='file'>
      <scratch file='{}'/>
    </disk>
  </disks>
</domainbackup>"#,
            incremental
                .map(|c| format!("\n  <incremental>{c}</incremental>"))
                .unwrap_or_default(),
            sock.display(),
            p.join("vda-fleece.qcow2").display()
        )
    };
    let checkpoint_xml = |cp: &str| {
        format!(
            "<domaincheckpoint><name>{cp}</name><disks><disk name='vda' checkpoint='bitmap'/></disks></domaincheckpoint>"
        )
    };
    let night = |n: usize, incremental: Option<&str>, cp: &str, args: &[&str]| {
        let b = p.join(format!("backup{n}.xml"));
        let c = p.join(format!("checkpoint{n}.xml"));
        std::fs::write(&b, backup_xml(incremental)).unwrap();
        std::fs::write(&c, checkpoint_xml(cp)).unwrap();
        virsh(&[
            "backup-begin",
            &name,
            &b.display().to_string(),
            &c.display().to_string(),
        ]);
        let before = guest_count(&log);
        let doc = ok(p, args);
        let during = guest_count(&log) - before;
        virsh(&["domjobabort", &name]);
        let _ = std::fs::remove_file(p.join("vda-fleece.qcow2"));
        (doc, during)
    };
    let (full, during) = night(
        1,
        None,
        "cp1",
        &["backup", &uri, "full.qcow2", "--speed", "8M"],
    );
    std::thread::sleep(Duration::from_secs(2));
    let (inc, _) = night(
        2,
        Some("cp1"),
        "cp2",
        &[
            "backup",
            "--sync",
            "incremental",
            "--source-bitmap",
            "backup-vda",
            "--backing",
            "full.qcow2",
            &uri,
            "inc.qcow2",
        ],
    );
    virsh(&["checkpoint-delete", &name, "cp1"]);
    let t_full = consistent_cut(p, "full.qcow2");
    let t_inc = consistent_cut(p, "inc.qcow2");
    eprintln!(
        "libvirt: {during} VM writes during the full backup, cut at record {t_full}; incremental cut at {t_inc}, {} bytes copied",
        inc["bytes_copied"]
    );
    assert!(
        during > 2 * SLOTS,
        "only {during} VM writes during the full backup"
    );
    assert!(t_inc > t_full);
    assert_eq!(full["source"], uri.as_str());
    // The incremental copied what the VM wrote since cp1: its record
    // slots, not the whole disk.
    let copied = inc["bytes_copied"].as_u64().unwrap();
    assert!(copied > 0 && copied <= 2 * SLOTS * 65536, "{inc}");
    check_clean(p, "inc.qcow2");
    run_ok(p, &["verify", "inc.qcow2"]);
}
