"""vm-tests: a small Talos-like QEMU image that joins a Gatekeeper server over SideroLink.

`vm-tests/run` builds the image (cached, see `image`), boots it under QEMU (`qemu`) on a tap
device inside a lab network namespace, and checks from the server's side (`scenario`).
"""
