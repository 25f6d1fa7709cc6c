"""The microVM runtime (QEMU ``-M microvm``): host-side boot artefacts, for now.

This step provides the pieces a microVM driver boots from: the host kernel and its modules,
the initramfs carrying ``cove-init`` (``guest/init.c``, the guest's PID 1), the command config
cove-init reads from the root disk, and the ext4 root disk itself. The driver (the
:class:`cove.runtime.base.Driver` implementation) comes later.
"""

from cove.runtime.microvm.initramfs import (
    DEFAULT_MODULES,
    GuestConfig,
    Kernel,
    boot_image,
    build_ext4_image,
    build_initramfs,
    ensure_guest_init,
    find_kernel,
    host_tsc_khz,
    kernel_cmdline,
    module_paths,
    resolve_modules,
    write_guest_config,
)

__all__ = [
    "DEFAULT_MODULES",
    "GuestConfig",
    "Kernel",
    "boot_image",
    "build_ext4_image",
    "build_initramfs",
    "ensure_guest_init",
    "find_kernel",
    "host_tsc_khz",
    "kernel_cmdline",
    "module_paths",
    "resolve_modules",
    "write_guest_config",
]
