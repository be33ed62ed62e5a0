#!/usr/bin/env bash
# Inject an NMI and a machine check into a running libvirt domain, found by its name.
#
#   examples/libvirt/inject.sh DOMAIN [VCPU]   a running domain of this host's libvirt
#   examples/libvirt/inject.sh --demo          a throw-away transient domain that boots
#                                              serrinj's x86 firmware guest, which prints on
#                                              its serial console what it observed
#
# Run as root (serrinj ptraces the domain's QEMU, which libvirt runs as another user
# unless qemu.conf says root). SERRINJ may name the command (default: serrinj).
set -euo pipefail
SERRINJ=${SERRINJ:-serrinj}
URI=${LIBVIRT_DEFAULT_URI:-qemu:///system}
PYTHON=${PYTHON:-python3}

demo_dir=""
domain=""
cleanup() {
  if [ -n "$demo_dir" ]; then
    [ -n "$domain" ] && virsh -c "$URI" destroy "$domain" >/dev/null 2>&1 || true
    rm -rf "$demo_dir"
  fi
}
trap cleanup EXIT

if [ "${1:-}" = "--demo" ]; then
  demo_dir=$(mktemp -d /tmp/serrinj-libvirt.XXXXXX)
  domain="serrinj-demo-$$"
  "$PYTHON" -m serrinj.testvm.firmware_x86 -o "$demo_dir/stub.bin"
  cat > "$demo_dir/domain.xml" <<XML
<domain type='kvm'>
  <name>$domain</name>
  <memory unit='MiB'>32</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64'>hvm</type><loader>$demo_dir/stub.bin</loader></os>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <serial type='file'><source path='$demo_dir/serial.log'/><target port='0'/></serial>
    <console type='file'><source path='$demo_dir/serial.log'/><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>
</domain>
XML
  virsh -c "$URI" create "$demo_dir/domain.xml"
  for _ in $(seq 100); do
    grep -q "ready cpu=1" "$demo_dir/serial.log" 2>/dev/null && break
    sleep 0.1
  done
  vcpu=1
else
  domain=${1:?usage: $0 DOMAIN [VCPU] | --demo}
  vcpu=${2:-0}
fi

echo "== serrinj list --name $domain"
"$SERRINJ" list --name "$domain"
echo "== serrinj nmi --name $domain --vcpu $vcpu --wait"
"$SERRINJ" nmi --name "$domain" --vcpu "$vcpu" --wait
echo "== serrinj mce --name $domain --vcpu $vcpu --preset srao --bank 3 --addr 0x9000 --wait"
"$SERRINJ" mce --name "$domain" --vcpu "$vcpu" --preset srao --bank 3 --addr 0x9000 --wait
if [ -n "$demo_dir" ]; then
  sleep 0.3
  echo "== what the guest printed on its serial console"
  cat "$demo_dir/serial.log"
fi
