#!/bin/sh
# /init of the arm64 lab (from the project piece of the initramfs).
# Mounts the usual filesystems, then either runs the suite and reports on the
# console (lab.mode=run) or opens a shell there (lab.mode=shell). Powers off
# at the end either way, which ends QEMU (-no-reboot).
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root USER=root LOGNAME=root TERM="${TERM:-vt100}" COLUMNS=120
export PYTHONPATH=/opt/serrinj PYTHONUNBUFFERED=1 LANG=C.UTF-8
# tests/conftest.py: a missing resource (kvm, root, ...) fails a host test here, never
# skips it; the host also fails any skip outside lab/skips.py's allow-list
export SERRINJ_REQUIRE_ALL=1
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
hostname lab-arm64
ip link set lo up 2>/dev/null
cd /opt/serrinj

mode=run
for word in $(cat /proc/cmdline); do
  case "$word" in lab.mode=*) mode="${word#lab.mode=}" ;; esac
done

if [ "$mode" = shell ]; then
  python3 -m lab.guest.runner --report-only
  cat <<'BANNER'

  serrinj arm64 lab: an emulated arm64 host with KVM (this is the guest).
    lab-suite                               run the whole suite as `make lab-arm64` does
    lab-suite lab/suite/test_smoke.py -k esr  run a selection (any pytest arguments)
    serrinj ...                             the CLI from your working tree (/opt/serrinj)
    poweroff -f                             leave (or Ctrl-A X for QEMU's escape)

BANNER
  setsid cttyhack sh -l
else
  python3 -m lab.guest.runner
fi
sync
poweroff -f
