//! Device drivers: PCI configuration access and virtio-net.
//!
//! `virtio-drivers` supplies PCI enumeration and the virtio PCI transport
//! (capabilities, feature negotiation, queue registration, notification);
//! the split virtqueues are Ferry's own ([`virtq`]) because the network
//! path needs full control of notification suppression: a used-buffer
//! interrupt costs ~70 us on this KVM, so the driver asks for one only
//! right before it halts, and kicks the device only when the device's
//! `avail_event` says it is waiting (VIRTIO_F_EVENT_IDX).

pub mod pci;
pub mod virtio_net;
pub mod virtq;
