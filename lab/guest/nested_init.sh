#!/bin/sh
# /init of the nested guest that the lab's inner QEMU boots. Prints a marker
# the host side waits for, optionally a heartbeat (lab.tick=SECONDS on the
# kernel command line) that shows it still runs, and keeps a shell on the
# console (respawned if it exits) for commands written to the serial port.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
tick=0
for word in $(cat /proc/cmdline); do
  case "$word" in lab.tick=*) tick="${word#lab.tick=}" ;; esac
done
echo "LAB-NESTED-GUEST-UP $(uname -r)"
if [ "$tick" -gt 0 ] 2>/dev/null; then
  (n=0; while true; do sleep "$tick"; n=$((n + 1)); echo "LAB-NESTED-TICK $n"; done) &
fi
while true; do
  setsid cttyhack sh
done
