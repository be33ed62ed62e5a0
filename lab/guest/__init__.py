"""Code that runs *inside* the arm64 lab (on the emulated arm64 host).

``init.sh`` becomes the lab's ``/init``; :mod:`lab.guest.runner` reports the
host's KVM and runs the suite; :mod:`lab.guest.plugin` turns pytest's results
into protocol lines; :mod:`lab.guest.nested` starts the inner QEMU for nested
tests. Nothing here may import the host tooling (:mod:`lab.arm64`).
"""
