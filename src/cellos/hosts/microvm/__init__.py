"""microVM backend pieces (DESIGN.md §5): guest boot image, sha256 manifest, QEMU probe.

``image.build_image`` builds a reproducible guest (Debian cloud kernel + a newc initramfs with
the CellOS guest init and busybox); ``manifest`` loads and verifies the digests before boot;
``qemu_probe.boot_once`` boots the image once and parses the guest channel.
"""
