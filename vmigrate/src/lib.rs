//! vmigrate: moving a running VM between hosts (vMotion) and its disk (Storage vMotion).
//!
//! Dirty-page tracking (KVM dirty log, dirty ring, the VMM's own bitmap), a versioned and
//! checksummed wire protocol, transports, and the pre-copy engine. Filled in by the vMotion issue.
#![deny(missing_docs, missing_debug_implementations)]
