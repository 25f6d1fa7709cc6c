"""The microVM runtime (QEMU ``-M microvm``).

The driver is :class:`cove.runtime.microvm.driver.MicroVMDriver` (its supervisor:
``cove.runtime.microvm.supervisor``, the control channel: ``protocol``, the root disk:
``disk``, KVM or TCG: ``accel``). This package exports the boot artefacts: the host kernel
and its modules, the initramfs carrying ``cove-init`` (``guest/init.c``, the guest's PID 1),
the file-config fallback cove-init also reads from the root disk, and ext4 images.
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
