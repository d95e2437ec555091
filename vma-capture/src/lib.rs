//! Live capture of running QEMU VMs over QMP and NBD into vma archives. Filled in by the capture work.
