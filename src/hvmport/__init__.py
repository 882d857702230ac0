"""hvmport: Xen's ioreq-server protocol with IOREQ_TYPE_VMWARE_PORT, on KVM or Unicorn."""

__version__ = "0.1.0"
